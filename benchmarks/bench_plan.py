"""Per-step cost of a stack of pool layers with and without the batched plan (CPU).

A decode step of a 28-layer stack of LoRIPoolLinear (hidden H -> H, one AdapterPool each,
8 resident adapters, rank 16, B 90% sparse), T = 32 tokens, ids uniform over the adapters
with ~20% of tokens on no adapter. Each timed step builds its plan (a model-level PoolPlan
from host ids, as ServingModel.plan does) and runs the 28 layers under use_plan:
  plan     the layers hand the plan's tensors to the op (PoolPlan.op_inputs, built once per
           step): no grouping / id check per call;
  no_plan  the same plan object with the op plan withheld (op_inputs returns the ids only),
           so every call groups and checks the ids itself: the behaviour before the plan
           argument existed.
Interleaved rounds (benchmarks.harness.compare): median and p20/p80 per step, `--repeats`
times; the table gives the median of the repeats' medians. One intra-op thread by default.

    PYTHONPATH=. GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296 \
        python -m benchmarks.bench_plan [--hidden 256 1024] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

import lori_kernels as L
from lori_kernels.nn import use_plan
from lori_kernels.pool import PoolPlan
from lori_kernels.testing import random_packed

from .harness import compare, machine

LAYERS, T, RESIDENT, RANK, DENSITY = 28, 32, 8, 16, 0.1


class _WithheldPlan(PoolPlan):
    """A PoolPlan whose op plan is withheld: the op groups the tokens in every call."""
    __slots__ = ()

    def op_inputs(self, x, snapshot=None):
        return self.token_ids(x), None


def _stack(hidden: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(LAYERS):
        pool = L.AdapterPool(hidden, hidden, RANK, capacity=RESIDENT)
        for k in range(RESIDENT):
            pool.add(f"a{k}", random_packed(hidden, RANK, density=DENSITY, generator=g),
                     seed=1000 * i + k, scale=2.0)
        lin = torch.nn.Linear(hidden, hidden)
        layers.append(L.LoRIPoolLinear(lin, pool))
    return layers


def run(hidden: int, repeats: int, min_time: float = 1.0) -> dict:
    layers = _stack(hidden)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, RESIDENT, (T,), generator=g)
    ids = torch.where(torch.rand(T, generator=g) < 0.2, -1, ids).to(torch.int32)
    x0 = torch.randn(T, hidden, generator=g) * 0.1

    def step(cls):
        def f():
            snaps = {lay.pool.key: lay.pool.snapshot() for lay in layers}
            plan = cls(None, snaps, host_ids=ids)
            with torch.no_grad(), use_plan(plan):
                x = x0
                for lay in layers:
                    x = lay(x)
            return x
        return f

    fns = {"plan": step(PoolPlan), "no_plan": step(_WithheldPlan)}
    a, b = fns["plan"](), fns["no_plan"]()
    if not torch.equal(a, b):
        raise AssertionError("the plan and no-plan steps disagree")
    reps = [compare(fns, min_time=min_time) for _ in range(repeats)]
    out = {}
    for name in fns:
        meds = [r[name]["median_us"] for r in reps]
        out[name] = {"median_us": statistics.median(meds), "repeat_medians_us": meds,
                     "p20_us": statistics.median(r[name]["p20_us"] for r in reps),
                     "p80_us": statistics.median(r[name]["p80_us"] for r in reps)}
    saved = out["no_plan"]["median_us"] - out["plan"]["median_us"]
    return {"hidden": hidden, "layers": LAYERS, "tokens": T, "resident": RESIDENT,
            "rank": RANK, "providers": out, "saved_per_step_us": saved,
            "saved_per_call_us": saved / LAYERS}


def run_op(hidden: int, repeats: int, min_time: float = 0.5) -> dict:
    """One layer's op call alone (no base linear, no Python layer): what the plan saves per
    call, without the step's other costs."""
    g = torch.Generator().manual_seed(2)
    pool = L.AdapterPool(hidden, hidden, RANK, capacity=RESIDENT)
    for k in range(RESIDENT):
        pool.add(f"a{k}", random_packed(hidden, RANK, density=DENSITY, generator=g), seed=k)
    ids = torch.randint(0, RESIDENT, (T,), generator=g)
    ids = torch.where(torch.rand(T, generator=g) < 0.2, -1, ids).to(torch.int32)
    plan = pool.plan(ids)
    x = torch.randn(T, hidden, generator=g)
    base = torch.randn(T, hidden, generator=g)
    tids, tplan = plan.op_inputs(x, plan.snapshot)
    args = plan.op_args()
    from lori_kernels import ops

    fns = {"plan": lambda: ops._batched_sparse_delta(x, tids, *args, base, None, tplan),
           "no_plan": lambda: ops._batched_sparse_delta(x, tids, *args, base, None, None)}
    if not torch.equal(fns["plan"](), fns["no_plan"]()):
        raise AssertionError("the plan and no-plan calls disagree")
    reps = [compare(fns, min_time=min_time) for _ in range(repeats)]
    return {"hidden": hidden, **{k: statistics.median(r[k]["median_us"] for r in reps)
                                 for k in fns}}


def report(rows: list[dict], mach: dict) -> str:
    lines = [f"CPU: {mach['cpu']} ({mach['cores']} cores, {mach['threads']} threads), "
             f"loadavg {mach['loadavg']}, torch {mach['torch']}, git {mach['git']}", "",
             "| hidden | no_plan step (us) | plan step (us) | saved / step | saved / call |",
             "|---|---|---|---|---|"]
    for r in rows:
        p, n = r["providers"]["plan"], r["providers"]["no_plan"]
        lines.append(f"| {r['hidden']} | {n['median_us']:.0f} [{n['p20_us']:.0f}, "
                     f"{n['p80_us']:.0f}] | {p['median_us']:.0f} [{p['p20_us']:.0f}, "
                     f"{p['p80_us']:.0f}] | {r['saved_per_step_us']:.0f} us | "
                     f"{r['saved_per_call_us']:.1f} us |")
    return "\n".join(lines)


def report_op(rows: list[dict]) -> str:
    lines = ["", "One op call (batched_sparse_delta with base, T = 32):", "",
             "| hidden | no_plan (us) | plan (us) | saved |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['hidden']} | {r['no_plan']:.1f} | {r['plan']:.1f} | "
                     f"{r['no_plan'] - r['plan']:.1f} us |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    # One intra-op thread by default: on a shared, loaded machine the wake-ups of a second
    # thread cost milliseconds per call and swamp the microseconds measured here.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run(h, args.repeats, args.min_time) for h in args.hidden]
    op_rows = [run_op(h, args.repeats) for h in args.hidden]
    mach = machine()
    print(report(rows, mach))
    print(report_op(op_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": mach, "rows": rows, "op_rows": op_rows}, f, indent=1)


if __name__ == "__main__":
    main()

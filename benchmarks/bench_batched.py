"""batched_sparse_delta (many adapters in one batch) vs what dense multi-LoRA serving computes.

Shape: in = out = 4096, rank 32, B 90% sparse. Cases: T=64 decode tokens over 1, 8 and 64
distinct adapters, T=2048 prefill over 8 adapters (contiguous requests of 256 tokens), and
T=2048 on one adapter. Baselines, timed in the same run (benchmarks.harness.compare):
  dense_loop   a Python loop of dense LoRA per adapter group (reference.dense_lora: two
               F.linear calls with that adapter's dense A and B), what users would write;
  stacked_bmm  gather A[ids], B[ids] per token from stacked dense (N, r, in) / (N, out, r)
               tensors and bmm (what dense multi-LoRA BGMV kernels compute); skipped at
               T=2048 (the gathers alone are 2 x 1 GiB in fp32);
  sparse_delta single-adapter LoRI op on the same tokens (cases with one adapter only).
`run(quick)` returns a dict; `report(data)` renders it as markdown.
"""
from __future__ import annotations

import torch

import lori_kernels as L
from lori_kernels import reference
from lori_kernels.testing import random_packed

from .harness import compare, machine

IN = OUT = 4096
RANK = 32
DENSITY = 0.1
SEED0 = 1234
SCALE = 2.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (name, T, adapters, layout): decode = tokens of distinct requests interleaved; prefill =
# contiguous runs of T / adapters tokens per adapter.
CASES = [("decode", 64, 1, "interleaved"), ("decode", 64, 8, "interleaved"),
         ("decode", 64, 64, "interleaved"), ("prefill", 2048, 8, "runs"),
         ("prefill", 2048, 1, "runs")]


class _Setup:
    """A 64-adapter pool and the same adapters as dense A/B, in one dtype."""

    def __init__(self, dtype, n=64):
        g = torch.Generator().manual_seed(0)
        self.pool = L.AdapterPool(IN, OUT, RANK, dtype=dtype, capacity=n)
        self.packed, self.a, self.b = [], [], []
        for i in range(n):
            b = random_packed(OUT, RANK, density=DENSITY, dtype=dtype, generator=g)
            self.pool.add(f"a{i}", b, seed=SEED0 + i, scale=SCALE)
            self.packed.append(b)
            self.a.append(L.random_a(SEED0 + i, RANK, IN, dtype=dtype))
            self.b.append(b.to_dense())
        self.a_all = torch.stack(self.a)  # (N, r, in)
        self.b_all = torch.stack(self.b)  # (N, out, r)
        self.dtype = dtype


def _ids(T, k, layout, g):
    if layout == "runs":
        return torch.arange(k).repeat_interleave(T // k)
    return torch.randperm(T, generator=g) % k


def _dense_loop(x, ids, st):
    return reference.batched_dense_lora(x, ids, st.a, st.b, [SCALE] * len(st.a))


def _stacked_bmm(x, ids, st):
    h = torch.bmm(st.a_all[ids], x[:, :, None])          # (T, r, 1)
    return torch.bmm(st.b_all[ids], h)[:, :, 0] * SCALE  # (T, out)


def case(st, name, T, k, layout, min_time=0.6):
    g = torch.Generator().manual_seed(T + k)
    x = torch.randn(T, IN, generator=g).to(st.dtype)
    ids = _ids(T, k, layout, g)
    ids32 = ids.to(torch.int32)
    fns = {"lori_batched": lambda: L.batched_sparse_delta(x, ids32, st.pool),
           "dense_loop": lambda: _dense_loop(x, ids, st)}
    if T <= 256:
        fns["stacked_bmm"] = lambda: _stacked_bmm(x, ids, st)
    if k == 1:
        e = st.pool.get("a0")
        fns["sparse_delta"] = lambda: L.sparse_delta(x, e.packed, seed=e.seed, scale=e.scale)
    with torch.no_grad():
        return compare(fns, min_time=min_time, min_reps=5 if T > 256 else 7)


def adapters_per_gib():
    rows = []
    dense = (RANK * IN + OUT * RANK) * 2
    for dname in ("bf16", "fp32"):
        st_pool = L.AdapterPool(IN, OUT, RANK, dtype=DTYPES[dname], capacity=1)
        st_pool.add("a", random_packed(OUT, RANK, density=DENSITY, dtype=DTYPES[dname],
                                       generator=torch.Generator().manual_seed(0)), seed=1)
        ours = st_pool.nbytes("a")
        rows.append({"values_dtype": dname, "ours_bytes": ours, "dense_bf16_bytes": dense,
                     "ours_per_gib": 2**30 // ours, "dense_bf16_per_gib": 2**30 // dense,
                     "ratio": dense / ours})
    return rows


def run(quick: bool = False, log=print) -> dict:
    """All cases in fp32 and bf16 (quick: fewer reps, bf16 prefill skipped)."""
    rows = []
    for dname, dtype in DTYPES.items():
        st = _Setup(dtype)
        for name, T, k, layout in CASES:
            if quick and T > 256 and dname == "bf16":
                continue
            res = case(st, name, T, k, layout, min_time=0.2 if quick else 0.6)
            for prov, r in res.items():
                rows.append({"bench": "batched", "case": name, "dtype": dname, "T": T,
                             "adapters": k, "in": IN, "out": OUT, "rank": RANK,
                             "provider": prov, **r})
            log(f"batched {name} {dname} T={T} adapters={k}: " + ", ".join(
                f"{p} {v['median_us']:.0f}us" for p, v in res.items()))
    return {"machine": machine(), "rows": rows, "adapters_per_gib": adapters_per_gib()}


def report(data: dict) -> str:
    by = {}
    for r in data["rows"]:
        by.setdefault((r["case"], r["dtype"], r["T"], r["adapters"]), {})[r["provider"]] = r
    lines = ["Batched multi-adapter application, in = out = 4096, rank 32, B 90% sparse. Medians "
             "(us) of interleaved runs; ratio = lori_batched / baseline, same run.", "",
             "| case | dtype | T | adapters | lori_batched | dense loop | ratio | stacked bmm | "
             "ratio | sparse_delta (1 adapter) | ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (name, dt, T, k), d in by.items():
        ours = d["lori_batched"]["median_us"]
        cells = []
        for prov in ("dense_loop", "stacked_bmm", "sparse_delta"):
            if prov in d:
                v = d[prov]["median_us"]
                cells.append(f"{v:.0f} | {ours / v:.3f}")
            else:
                cells.append("- | -")
        lines.append(f"| {name} | {dt} | {T} | {k} | {ours:.0f} "
                     f"(p20 {d['lori_batched']['p20_us']:.0f}, p80 {d['lori_batched']['p80_us']:.0f}) | "
                     + " | ".join(cells) + " |")
    lines += ["", "| adapter layer 4096x4096, rank 32 | bytes | adapters per GiB | vs dense bf16 LoRA |",
              "|---|---:|---:|---:|"]
    for s in data["adapters_per_gib"]:
        lines.append(f"| LoRI pool slot, {s['values_dtype']} values | {s['ours_bytes']} | "
                     f"{s['ours_per_gib']} | {s['ratio']:.1f}x |")
    s = data["adapters_per_gib"][0]
    lines.append(f"| dense bf16 LoRA (A + B) | {s['dense_bf16_bytes']} | {s['dense_bf16_per_gib']} | 1x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="T=64 fp32 cases only, few reps")
    args = ap.parse_args()
    if args.smoke:
        st = _Setup(torch.float32)
        rows = []
        for name, T, k, layout in CASES[:3]:
            for prov, r in case(st, name, T, k, layout, min_time=0.1).items():
                rows.append({"case": name, "dtype": "fp32", "T": T, "adapters": k,
                             "provider": prov, **r})
        print(report({"rows": rows, "adapters_per_gib": adapters_per_gib()}))
    else:
        print(report(run(args.quick)))

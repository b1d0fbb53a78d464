"""batched_sparse_delta (many adapters in one batch) vs what dense multi-LoRA serving computes.

Shape: in = out = 4096, rank 32, B 90% sparse. Cases: T=64 decode tokens over 1, 4, 8, 16 and
64 distinct adapters (the time-vs-adapters plot), T=2048 prefill over 8 adapters (contiguous
requests of 256 tokens), and T=2048 on one adapter (quick mode: T=64 over 1 and 8 adapters). Baselines, timed in the same run (benchmarks.harness.compare):
  dense_loop   a Python loop of dense LoRA per adapter group (reference.dense_lora: two
               F.linear calls with that adapter's dense A and B), what users would write;
  stacked_bmm  gather A[ids], B[ids] per token from stacked dense (N, r, in) / (N, out, r)
               tensors and bmm (what dense multi-LoRA BGMV kernels compute); skipped at
               T=2048 (the gathers alone are 2 x 1 GiB in fp32);
  sparse_delta single-adapter LoRI op on the same tokens (cases with one adapter only).
Each case first checks lori_batched against the fp64 loop (the tolerance rule), untimed.
"""
from __future__ import annotations

import torch

import lori_kernels as L
from lori_kernels import reference
from lori_kernels.testing import assert_within_rule, random_packed

from .harness import EXTRAS, bench

IN = OUT = 4096
RANK = 32
DENSITY = 0.1
SEED0 = 1234
SCALE = 2.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (name, T, adapters, layout): decode = tokens of distinct requests interleaved; prefill =
# contiguous runs of T / adapters tokens per adapter.
CASES = [("decode", 64, 1, "interleaved"), ("decode", 64, 4, "interleaved"),
         ("decode", 64, 8, "interleaved"), ("decode", 64, 16, "interleaved"),
         ("decode", 64, 64, "interleaved"), ("prefill", 2048, 8, "runs"),
         ("prefill", 2048, 1, "runs")]
QUICK_CASES = [("decode", 64, 1, "interleaved"), ("decode", 64, 8, "interleaved")]


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


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ == "test_batched":
        quick = metafunc.config.getoption("--bench-quick")
        ps = [(d, *c) for d in DTYPES for c in (QUICK_CASES if quick else CASES)]
        metafunc.parametrize("case", ps, ids=[f"{d}-{n}-T{T}-k{k}" for d, n, T, k, _ in ps])


_SETUPS: dict = {}


def _setup_for(dname: str, n: int) -> _Setup:
    """One pool per dtype for all cases (building 64 adapters is the slow part)."""
    if (dname, n) not in _SETUPS:
        _SETUPS.clear()
        _SETUPS[(dname, n)] = _Setup(DTYPES[dname], n)
    return _SETUPS[(dname, n)]


def test_batched(benchmark, case, quick):
    dname, name, T, k, layout = case
    st = _setup_for(dname, 8 if quick else 64)
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
        used = sorted(set(ids.tolist()))
        a64 = [st.a[i].double() if i in used else None for i in range(len(st.a))]
        b64 = [st.b[i].double() if i in used else None for i in range(len(st.b))]
        ref64 = reference.batched_dense_lora(x.double(), ids, a64, b64, [SCALE] * len(st.a))
        assert_within_rule(fns["lori_batched"](), ref64, fns["dense_loop"](),
                           f"lori_batched {case}")
        if quick:
            kw = {"min_time": 0.05, "min_reps": 3, "warmup": 1}
        else:
            kw = {"min_time": 0.6, "min_reps": 5 if T > 256 else 7}
        bench(benchmark, fns, baseline="dense_loop", **kw,
              info={"suite": "batched", "case": name, "dtype": dname, "T": T, "adapters": k,
                    "layout": layout, "in": IN, "out": OUT, "rank": RANK})


def test_adapters_per_gib():
    EXTRAS["adapters_per_gib"] = adapters_per_gib()


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

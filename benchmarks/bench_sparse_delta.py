"""sparse_delta vs dense LoRA (what users write: two F.linear calls, A and B dense, same dtype)."""
from __future__ import annotations

import torch

import lori_kernels as L
from lori_kernels import reference
from lori_kernels.testing import random_packed

from .harness import compare

SEED = 1234
SCALE = 2.0


def _setup(T, inp, out, rank, dtype, dist, density=0.1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, inp, generator=g).to(dtype)
    b = random_packed(out, rank, density=density, dtype=dtype, generator=g)
    a_dense = L.random_a(SEED, rank, inp, distribution=dist, dtype=dtype)
    b_dense = b.to_dense()
    return x, b, a_dense, b_dense


def forward_cases(T, inp, out, rank, dtype, dists=("rademacher",)):
    x, b, a, bd = _setup(T, inp, out, rank, dtype, dists[0])
    fns = {"dense_lora": lambda: reference.dense_lora(x, a, bd, SCALE)}
    for d in dists:
        fns[f"lori_{d}"] = (lambda d=d: L.sparse_delta(x, b, seed=SEED, distribution=d, scale=SCALE))
    with torch.no_grad():
        return compare(fns)


def fwd_bwd_cases(T, inp, out, rank, dtype, dist="rademacher"):
    x, b, a, bd = _setup(T, inp, out, rank, dtype, dist)
    x = x.requires_grad_()
    bdp = bd.clone().requires_grad_()         # dense LoRA trains all of B
    vals = b.values.clone().requires_grad_()  # LoRI trains B's pattern entries only
    bb = b.with_values(vals)
    gy = torch.randn(T, out, generator=torch.Generator().manual_seed(1)).to(dtype)

    def dense():
        x.grad = bdp.grad = None
        reference.dense_lora(x, a, bdp, SCALE).backward(gy)

    def ours():
        x.grad = vals.grad = None
        L.sparse_delta(x, bb, seed=SEED, distribution=dist, scale=SCALE).backward(gy)

    return compare({"dense_lora": dense, f"lori_{dist}": ours})


def a_generation(rank=32, inp=4096):
    fns = {d: (lambda d=d: L.random_a(SEED, rank, inp, distribution=d)) for d in L.DISTRIBUTIONS}
    res = compare(fns)
    for d, r in res.items():
        r["elements_per_s"] = rank * inp / (r["median_us"] * 1e-6)
    return res


def adapter_bytes(inp=4096, out=4096, rank=32, density=0.1):
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        b = random_packed(out, rank, density=density, dtype=dtype,
                          generator=torch.Generator().manual_seed(0))
        dense_bf16 = (rank * inp + out * rank) * 2
        rows.append({"values_dtype": str(dtype).replace("torch.", ""), "in": inp, "out": out,
                     "rank": rank, "sparsity": 1 - density, "ours_bytes": b.nbytes,
                     "mask_bytes": b.mask.numel() * 4, "values_bytes": b.values.numel() * b.values.element_size(),
                     "offsets_bytes": b.offsets.numel() * 4, "dense_bf16_lora_bytes": dense_bf16,
                     "ratio": b.nbytes / dense_bf16})
    return rows

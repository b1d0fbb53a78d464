"""Pure-PyTorch references for every op, written from the specs, not from the kernels.

Slow and simple on purpose: the tests compare every backend against these, and the
benchmarks take their dense-LoRA baseline from here too.
"""
from __future__ import annotations

import torch

from . import spec

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(m: int, c: torch.Tensor):
    """(hi, lo) 32-bit halves of m * c for 32-bit m and int64 tensor c in [0, 2**32).

    Split c into 16-bit halves so no intermediate leaves int64's range."""
    c_lo, c_hi = c & 0xFFFF, c >> 16
    p_lo = m * c_lo                    # < 2**48
    p_hi = m * c_hi                    # < 2**48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    lo = mid & _MASK32
    hi = (p_hi >> 16) + (mid >> 32)
    return hi & _MASK32, lo


def philox4x32_10(counter: torch.Tensor, key0: int, key1: int) -> torch.Tensor:
    """Philox4x32-10 on int64 tensors holding uint32 values; counter (..., 4) -> (..., 4)."""
    c = [counter[..., i].to(torch.int64) & _MASK32 for i in range(4)]
    k0, k1 = key0 & _MASK32, key1 & _MASK32
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c[0])
        hi1, lo1 = _mulhilo(_M1, c[2])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return torch.stack(c, dim=-1)


def random_a(seed: int, rank: int, in_features: int, distribution: str = "rademacher",
             dtype: torch.dtype = torch.float32, col_start: int = 0, col_end: int | None = None,
             ) -> torch.Tensor:
    """A[:, col_start:col_end] straight from docs/spec_a.md (seed is the unsigned seed)."""
    dist_id = spec.check_distribution(distribution)
    col_end = in_features if col_end is None else col_end
    seed = spec.seed_from_op(spec.check_seed(seed))
    k0, k1 = seed & _MASK32, seed >> 32
    e = spec.ELEMS_PER_BLOCK[distribution]
    rows = torch.arange(rank, dtype=torch.int64)[:, None].expand(rank, col_end - col_start)
    cols = torch.arange(col_start, col_end, dtype=torch.int64)[None, :].expand_as(rows)
    counter = torch.stack([cols // e, rows, torch.full_like(rows, dist_id),
                           torch.zeros_like(rows)], dim=-1)
    blocks = philox4x32_10(counter, k0, k1)  # (rank, ncols, 4)
    mag = torch.tensor(spec.magnitude(distribution, in_features), dtype=torch.float32)
    within = cols % e
    if distribution == "rademacher":
        word = torch.gather(blocks, -1, (within // 32)[..., None])[..., 0]
        neg = (word >> (within % 32)) & 1
        a = torch.where(neg.bool(), -mag, mag)
    else:
        word = torch.gather(blocks, -1, within[..., None])[..., 0]
        k = word >> 9
        unit = (2 * k + 1 - (1 << 23)).to(torch.float32) * 2.0 ** -23  # exact in fp32
        a = unit * mag  # one fp32 multiply, correctly rounded
    return a.to(dtype)


def sparse_delta(x: torch.Tensor, b_dense: torch.Tensor, seed: int, distribution: str,
                 scale: float, compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """y = scale * (x @ A^T) @ B^T in compute_dtype (float64 by default), B given dense."""
    a = random_a(seed, b_dense.shape[1], x.shape[-1], distribution).to(x.device, compute_dtype)
    h = x.to(compute_dtype) @ a.T
    return (h @ b_dense.to(x.device, compute_dtype).T) * scale


def dense_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """What users write for LoRA, in x's dtype: the benchmark and tolerance baseline."""
    return torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * scale

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


def _window(width: int, col_start: int, in_features: int | None) -> tuple[int, int]:
    """(in_features of the whole A, end column) of the window x holds (None/-1: unsharded)."""
    n = width if in_features is None or in_features == -1 else in_features
    if not 0 <= col_start <= n - width:
        raise ValueError(f"col_start + width = {col_start} + {width} exceeds in_features = {n}")
    return n, col_start + width


def shrink(x: torch.Tensor, rank: int, seed: int, distribution: str, col_start: int = 0,
           in_features: int | None = None,
           compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """h = x @ A[:, col_start:col_start + x.shape[-1]]^T in compute_dtype, A in_features wide
    (None: x's width). No scale: that is expand's."""
    n, end = _window(x.shape[-1], col_start, in_features)
    a = random_a(seed, rank, n, distribution, col_start=col_start, col_end=end)
    return x.to(compute_dtype) @ a.to(x.device, compute_dtype).T


def expand(h: torch.Tensor, b_dense: torch.Tensor, scale: float,
           compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """y = scale * h @ B^T in compute_dtype, B given dense."""
    return (h.to(compute_dtype) @ b_dense.to(h.device, compute_dtype).T) * scale


def sparse_delta(x: torch.Tensor, b_dense: torch.Tensor, seed: int, distribution: str,
                 scale: float, compute_dtype: torch.dtype = torch.float64, col_start: int = 0,
                 in_features: int | None = None) -> torch.Tensor:
    """y = scale * (x @ A^T) @ B^T in compute_dtype (float64 by default), B given dense.

    With a column window, x holds A's columns [col_start, col_start + x.shape[-1]) of an A
    in_features wide: the sum of the shards' results is the unsharded one."""
    h = shrink(x, b_dense.shape[1], seed, distribution, col_start, in_features, compute_dtype)
    return expand(h, b_dense, scale, compute_dtype)


def dense_lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """What users write for LoRA, in x's dtype: the benchmark and tolerance baseline."""
    return torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * scale


def merge_delta(weight: torch.Tensor, b_dense: torch.Tensor, seed: int, distribution: str,
                scale: float, col_start: int = 0, in_features: int | None = None) -> torch.Tensor:
    """weight + scale * B @ A computed in float64 and rounded once to weight's dtype (what
    merge_delta_ writes in place). With a window, weight is the column shard
    W[:, col_start:col_start + weight.shape[1]] of a W in_features wide."""
    n, end = _window(weight.shape[1], col_start, in_features)
    a = random_a(seed, b_dense.shape[1], n, distribution, col_start=col_start,
                 col_end=end).to(weight.device, torch.float64)
    delta = (b_dense.to(weight.device, torch.float64) @ a) * scale
    return (weight.double() + delta).to(weight.dtype)


def _unpack_words(words: torch.Tensor, rank: int) -> torch.Tensor:
    bits = (words.to(torch.int64)[..., None] >> torch.arange(32, device=words.device)) & 1
    return bits.flatten(-2)[..., :rank].bool()


def batched_sparse_delta(x: torch.Tensor, adapter_ids: torch.Tensor, masks: torch.Tensor,
                         values: torch.Tensor, value_starts: torch.Tensor, offsets: torch.Tensor,
                         seeds: torch.Tensor, scales: torch.Tensor, distributions: torch.Tensor,
                         rank: int, base: torch.Tensor | None = None,
                         compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The batched op's semantics, token by token group, in compute_dtype (float64 default):

        y[t] = base[t] + scales[a] * (x[t] @ A_a^T) @ B_a^T,  a = adapter_ids[t]  (-1: none)

    with the op's arguments (a pool's tensors; AdapterPool.op_args()). Returned in
    compute_dtype; B_a is (masks[a], values[value_starts[a] + offsets[a, :]])."""
    shape = (*x.shape[:-1], masks.shape[1])
    xt = x.reshape(-1, x.shape[-1]).to(compute_dtype)
    ids = adapter_ids.reshape(-1).long()
    y = torch.zeros(xt.shape[0], masks.shape[1], dtype=compute_dtype, device=x.device)
    names = {1: "rademacher", 2: "uniform"}
    for a in ids.unique().tolist():
        if a < 0:
            continue
        sel = (ids == a).nonzero().flatten()
        bits = _unpack_words(masks[a], rank)
        start, nnz = int(value_starts[a]), int(offsets[a, -1])
        b = torch.zeros(masks.shape[1], rank, dtype=compute_dtype, device=x.device)
        b[bits] = values[start:start + nnz].to(compute_dtype)
        seed = spec.seed_from_op(int(seeds[a]))
        am = random_a(seed, rank, x.shape[-1], names[int(distributions[a])]).to(x.device,
                                                                               compute_dtype)
        y[sel] = (xt[sel] @ am.T) @ b.T * float(scales[a])
    if base is not None:
        y = y + base.reshape(y.shape).to(compute_dtype)
    return y.reshape(shape)


def batched_plan(adapter_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batched ops' plan of these ids, (plan_order, plan_starts, plan_adapters), int32 on
    the ids' device: order = a stable argsort of the ids (-1 tokens first), then the
    run-length encoding of the sorted ids (group g = order[starts[g]:starts[g + 1]], all of
    adapter adapters[g]). Unique for given ids: the form the op checks a plan against."""
    ids = adapter_ids.reshape(-1).to(torch.int64)
    sorted_ids, order = torch.sort(ids, stable=True)
    adapters, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    starts = torch.zeros(adapters.numel() + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=starts[1:])
    return order.to(torch.int32), starts.to(torch.int32), adapters.to(torch.int32)


def batched_dense_lora(x: torch.Tensor, adapter_ids: torch.Tensor, a: list, b: list,
                       scales: list) -> torch.Tensor:
    """What users write for many LoRA adapters in one batch, in x's dtype: a loop over the
    adapters present, dense_lora on each one's tokens (the batched benchmarks' baseline)."""
    y = torch.zeros(*x.shape[:-1], b[0].shape[0], dtype=x.dtype, device=x.device)
    for i in adapter_ids.unique().tolist():
        if i < 0:
            continue
        sel = (adapter_ids == i).nonzero().flatten()
        y[sel] = dense_lora(x[sel], a[i], b[i], scales[i])
    return y

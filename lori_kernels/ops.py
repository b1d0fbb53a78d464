"""The op surface: typed wrappers over torch.ops.lori.*, each routed by lori_kernels.backends.

This module is the only Python caller of torch.ops.lori in the package. Schemas live in
csrc/ops.cpp; fakes in lori_kernels._library; autograd of the C++ ops in csrc/autograd*.cpp and
of the Triton ops in lori_kernels/triton/ops.py. Each public wrapper validates its Python-level
arguments (types, seeds) and hands plain tensors to the op; the underscore functions below are
the same calls without that layer, for the nn modules' per-step calls whose arguments were
validated when the adapter was built.
"""
from __future__ import annotations

import torch

from . import backends, spec
from ._library import ops as _ops
from .packing import PackedB

# The op of each backend, by name: backends.resolve picks the key.
_SPARSE_DELTA = {"cpp": _ops.sparse_delta, "triton": _ops.triton_sparse_delta}
_MERGE = {"cpp": _ops.merge_delta_, "triton": _ops.triton_merge_delta_}
_BATCHED = {"cpp": _ops.batched_sparse_delta, "triton": _ops.triton_batched_sparse_delta}
_SHRINK = {"cpp": _ops.shrink, "triton": _ops.triton_shrink}
_EXPAND = {"cpp": _ops.expand, "triton": _ops.triton_expand}


# ---- raw calls (arguments already validated by the caller's layer) ------------------------------

def _sparse_delta(x, mask, values, offsets, rank: int, seed_op: int, distribution: str,
                  scale: float, backend: str | None = None, col_start: int = 0,
                  in_features: int = -1) -> torch.Tensor:
    return _SPARSE_DELTA[backends.resolve(backend, x.device)](
        x, mask, values, offsets, rank, seed_op, distribution, scale, col_start, in_features)


def _merge_delta_(weight, mask, values, offsets, rank: int, seed_op: int, distribution: str,
                  scale: float, backend: str | None = None, col_start: int = 0,
                  in_features: int = -1) -> None:
    with torch.no_grad():
        _MERGE[backends.resolve(backend, weight.device)](
            weight, mask, values, offsets, rank, seed_op, distribution, scale, col_start,
            in_features)


def _shrink(x, rank: int, seed_op: int, distribution: str, col_start: int = 0,
            in_features: int = -1, backend: str | None = None) -> torch.Tensor:
    return _SHRINK[backends.resolve(backend, x.device)](x, rank, seed_op, distribution,
                                                          col_start, in_features)


def _expand(h, mask, values, offsets, scale: float, backend: str | None = None) -> torch.Tensor:
    return _EXPAND[backends.resolve(backend, h.device)](h, mask, values, offsets, scale)


def _batched_sparse_delta(x, ids, masks, values, value_starts, offsets, seeds, scales,
                          distributions, rank: int, base=None, backend: str | None = None,
                          plan=None) -> torch.Tensor:
    """plan: None or (plan_order, plan_starts, plan_adapters) of these ids (PoolPlan.op_inputs),
    trusted under validation "on" (the op schema's comment)."""
    op = _BATCHED[backends.resolve(backend, x.device)]
    if plan is None:
        return op(x, ids, masks, values, value_starts, offsets, seeds, scales, distributions,
                  rank, base)
    return op(x, ids, masks, values, value_starts, offsets, seeds, scales, distributions, rank,
              base, *plan)


def sparse_delta_fwd(x, mask, values, offsets, rank, seed_op, distribution, scale,
                     col_start: int = 0, in_features: int = -1):
    """(y, h): sparse_delta and h = x @ A^T (tokens, rank) in fp32 (fp64 for fp64 x); C++ only."""
    return _ops.sparse_delta_fwd(x, mask, values, offsets, rank, seed_op, distribution, scale,
                                 col_start, in_features)


def sparse_delta_backward(grad_y, x, mask, values, offsets, rank, seed_op, distribution, scale,
                          need_x: bool, need_values: bool, h=None, backend: str | None = None,
                          col_start: int = 0, in_features: int = -1):
    """(grad_x, grad_values) of sparse_delta (empty tensors where need_* is False)."""
    if backends.resolve(backend, x.device) == "triton":
        return _ops.triton_sparse_delta_backward(grad_y, x, mask, values, offsets, rank, seed_op,
                                                 distribution, scale, need_x, need_values,
                                                 col_start, in_features)
    return _ops.sparse_delta_backward(grad_y, x, mask, values, offsets, rank, seed_op,
                                      distribution, scale, need_x, need_values, h, col_start,
                                      in_features)


def shrink_backward(grad_h, width: int, dtype: torch.dtype, rank: int, seed_op: int,
                    distribution: str, col_start: int = 0, in_features: int = -1,
                    backend: str | None = None) -> torch.Tensor:
    """grad_x (..., width) in dtype = grad_h @ A_window (the backward of shrink)."""
    op = (_ops.triton_shrink_backward if backends.resolve(backend, grad_h.device) == "triton"
          else _ops.shrink_backward)
    return op(grad_h, width, dtype, rank, seed_op, distribution, col_start, in_features)


def expand_backward(grad_y, h, mask, values, offsets, scale: float, need_h: bool,
                    need_values: bool, backend: str | None = None):
    """(grad_h, grad_values) of expand (empty tensors where need_* is False)."""
    op = (_ops.triton_expand_backward if backends.resolve(backend, h.device) == "triton"
          else _ops.expand_backward)
    return op(grad_y, h, mask, values, offsets, scale, need_h, need_values)


def philox4x32_10(counters: torch.Tensor, seed: int) -> torch.Tensor:
    """Philox4x32-10 blocks of int32 counters (N, 4) under a 64-bit seed (spec_a's RNG)."""
    return _ops.philox4x32_10(counters, spec.check_seed(seed))


def set_cpu_isa(isa: str) -> str:
    """Cap the CPU kernels' instruction set ("auto" | "avx512" | "avx2" | "generic"); returns
    the previous level. For tests and benchmarks of each vector path on one machine."""
    return _ops._set_cpu_isa(isa)


# ---- typed public wrappers ----------------------------------------------------------------------

def random_a(seed: int, rank: int, in_features: int, *, distribution: str = spec.DEFAULT_DISTRIBUTION,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             columns: tuple[int, int] | None = None, backend: str | None = None) -> torch.Tensor:
    """Materialize A (rank, in_features), or its column slice A[:, c0:c1] with columns=(c0, c1),
    from a 64-bit seed, bit-identically on every backend (docs/spec_a.md).

    A's entries are fp32 values rounded once (round-to-nearest-even) to `dtype`.
    backend: None/'auto'/'cpp'/'triton' (lori_kernels.backends).
    """
    seed_i64 = spec.check_seed(seed)
    spec.check_distribution(distribution)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    c0, c1 = (0, in_features) if columns is None else columns
    if not 0 <= c0 <= c1 <= in_features:
        raise ValueError(f"columns must satisfy 0 <= c0 <= c1 <= in_features={in_features}, "
                         f"got {columns!r}")
    device = torch.device(device)
    if backends.resolve(backend, device) == "triton":
        out = torch.empty((rank, c1 - c0), dtype=dtype, device=device)
        _ops.triton_random_a_fill(out, seed_i64, in_features, c0, distribution)
        return out
    return _ops.random_a(seed_i64, rank, in_features, distribution, c0, c1, dtype=dtype,
                         device=device)


def _check_packed(b) -> None:
    if not isinstance(b, PackedB):
        raise TypeError(f"b must be a PackedB (see lori_kernels.pack_bitmask), got "
                        f"{type(b).__name__}")


def _check_window(col_start, in_features) -> tuple[int, int]:
    """(col_start, in_features as the ops take it: -1 for None)."""
    if isinstance(col_start, bool) or not isinstance(col_start, int):
        raise TypeError(f"col_start must be an int, got {type(col_start).__name__}")
    if in_features is None:
        return col_start, -1
    if isinstance(in_features, bool) or not isinstance(in_features, int):
        raise TypeError(f"in_features must be an int or None, got {type(in_features).__name__}")
    return col_start, in_features


def sparse_delta(x: torch.Tensor, b: PackedB, *, seed: int,
                 distribution: str = spec.DEFAULT_DISTRIBUTION, scale: float = 1.0,
                 col_start: int = 0, in_features: int | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """LoRI delta: y = scale * (x @ A^T) @ B^T, x of shape (..., in_features).

    A (b.rank, in_features) is regenerated inside the kernel from (seed, distribution) and never
    materialized beyond a tile; B (out_features, rank) is read in its bitmask form. Gradients
    flow to x and to b.values (only the pattern's entries); A gets none.

    Column window (tensor parallelism): with col_start / in_features, x holds A's columns
    [col_start, col_start + x.shape[-1]) of an A in_features wide (None: x's width), with the
    whole A's scale and Philox columns, so summing the shards' results gives the unsharded one.
    backend: None/'auto'/'cpp'/'triton' (lori_kernels.backends).
    """
    _check_packed(b)
    seed_i64 = spec.check_seed(seed)
    spec.check_distribution(distribution)
    c0, n_in = _check_window(col_start, in_features)
    return _sparse_delta(x, b.mask, b.values, b.offsets, b.rank, seed_i64, distribution,
                         float(scale), backend, c0, n_in)


def merge_delta_(weight: torch.Tensor, b: PackedB, *, seed: int,
                 distribution: str = spec.DEFAULT_DISTRIBUTION, scale: float = 1.0,
                 col_start: int = 0, in_features: int | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """In place: weight (out_features, in_features) += scale * B @ A, A generated per column
    tile (never whole). Unmerge with -scale. Returns weight. With col_start / in_features,
    weight is the column shard W[:, col_start:col_start + weight.shape[1]] of a W in_features
    wide (as sparse_delta's window).
    backend: None/'auto'/'cpp'/'triton' (lori_kernels.backends)."""
    _check_packed(b)
    seed_i64 = spec.check_seed(seed)
    spec.check_distribution(distribution)
    c0, n_in = _check_window(col_start, in_features)
    _merge_delta_(weight, b.mask, b.values, b.offsets, b.rank, seed_i64, distribution,
                  float(scale), backend, c0, n_in)
    return weight


def shrink(x: torch.Tensor, *, rank: int, seed: int,
           distribution: str = spec.DEFAULT_DISTRIBUTION, col_start: int = 0,
           in_features: int | None = None, backend: str | None = None) -> torch.Tensor:
    """The first stage of sparse_delta: h = x @ A_window^T, (..., rank) in float32 (float64 for
    float64 x), A regenerated from (seed, distribution) with the column window of sparse_delta.

    No scale: it belongs to expand, so h is the same for every scale and the shards' h add up
    to the unsharded h (a row-parallel layer all-reduces h, T x rank, instead of y).
    Differentiable w.r.t. x. backend: None/'auto'/'cpp'/'triton'."""
    seed_i64 = spec.check_seed(seed)
    spec.check_distribution(distribution)
    c0, n_in = _check_window(col_start, in_features)
    return _shrink(x, rank, seed_i64, distribution, c0, n_in, backend)


def expand(h: torch.Tensor, b: PackedB, *, scale: float = 1.0,
           backend: str | None = None) -> torch.Tensor:
    """The second stage of sparse_delta: y = scale * h @ B^T, (..., out_features) in b.values'
    dtype; h (..., rank) in float32 (float64 for float64 values), as shrink returns it.
    Differentiable w.r.t. h and b.values. backend: None/'auto'/'cpp'/'triton'."""
    _check_packed(b)
    return _expand(h, b.mask, b.values, b.offsets, float(scale), backend)


def batched_sparse_delta(x: torch.Tensor, adapter_ids, pool, *,
                         base: torch.Tensor | None = None,
                         backend: str | None = None) -> torch.Tensor:
    """Many LoRI adapters of one AdapterPool in one batch (punica BGMV semantics):

        y[t] = base[t] + scale_a * (x[t] @ A_a^T) @ B_a^T,   a = adapter_ids[t]

    with a == -1 meaning no adapter (y[t] = base[t], or 0 without base). x is
    (..., in_features); adapter_ids holds one id per token (a tensor of slot indices, or a
    sequence of adapter names / slot indices / None, resolved by pool.ids). Inside, tokens are
    grouped by adapter, so each adapter's A is generated once per batch, not once per token.
    `base` (shape (..., out_features), x's dtype) is the accumulate form: base + delta,
    rounded once. Gradients flow to x, base and pool.values (every used adapter's B entries).
    pool.values must be in x's dtype, else it is converted on every call.
    backend: None/'auto'/'cpp'/'triton' (lori_kernels.backends). Ids and used adapters'
    extents are checked on the device with one host sync per call unless validation is off
    (lori_kernels.backends.set_validation) or a plan's grouping is handed in (below).

    `pool` is an AdapterPool, or any object with its `op_args()`, `ids()` and `in_features`;
    or a PoolPlan (pool.plan(...)) with adapter_ids its own `plan.ids`: then the plan's
    grouping of the tokens is handed to the op too (no grouping, no id check per call).
    """
    op_args = getattr(pool, "op_args", None)
    if op_args is None or not hasattr(pool, "in_features"):
        raise TypeError(f"pool must be an AdapterPool, got {type(pool).__name__}")
    if x.shape[-1] != pool.in_features:
        raise ValueError(f"x has {x.shape[-1]} features but the pool's adapters take "
                         f"in_features={pool.in_features}")
    plan = None
    op_inputs = getattr(pool, "op_inputs", None)
    if op_inputs is not None and adapter_ids is pool.ids:
        # the plan's own ids: its grouping is theirs (any other ids tensor is grouped by the op)
        ids, plan = op_inputs(x, pool.snapshot)
    else:
        ids = adapter_ids if isinstance(adapter_ids, torch.Tensor) else pool.ids(adapter_ids)
    masks, values, starts, offsets, seeds, scales, dists, rank = op_args()
    if values.dtype != x.dtype:
        values = values.to(x.dtype)
    return _batched_sparse_delta(x, ids.reshape(-1), masks, values, starts, offsets, seeds,
                                 scales, dists, rank, base, backend, plan)

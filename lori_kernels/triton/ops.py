"""Registers the Triton kernels of the lori ops (schemas in csrc/ops.cpp), with fake kernels and
autograd. Each triton_X has the semantics, argument checks and error messages of the C++ op X.

  triton_sparse_delta:   y = scale * (x @ A^T) @ B^T, A (rank, in) from (seed, distribution),
                         B (out, rank) = (mask, values, offsets); y in x's dtype.
  triton_sparse_delta_backward: (grad_x, grad_values) = (scale * (gy @ B) @ A,
                         scale * sum_t gy[t, o] h[t, k] per pattern entry), h = x @ A^T.
  triton_random_a_fill:  out[r, c] = A[r, col_start + c] (in place).
  triton_merge_delta_:   weight (out, in) += scale * B @ A (in place; unmerge: -scale).
  triton_batched_sparse_delta: y[t] = base[t] + scales[a] * (x[t] @ A_a^T) @ B_a^T,
                         a = adapter_ids[t] (-1: no adapter), adapters of one pool.
  triton_batched_sparse_delta_backward: (grad_x, grad_values over the whole values buffer);
                         adapters sharing a value range sum their gradients.

Autograd: x and values get gradients (and base: grad_y itself); A is frozen.

Checks: shapes/dtypes/devices on the host, reading nothing. B contents (mask vs offsets) are
validated on the host for CPU tensors; on CUDA only with LORI_TRITON_VALIDATE=1 (it syncs);
unvalidated kernels still never read outside `values`. The batched ops also check the ids
(-1 <= id < N) and each used adapter's value extent and distribution with device-side
reductions and ONE host sync per call (free for CPU tensors); LORI_TRITON_BATCHED_CHECKS=0
skips that sync (e.g. for CUDA graph capture): bad ids then count as -1 and extents are clamped,
so nothing is read out of bounds, but no error is raised either.

Kernels run on CUDA tensors, and on CPU tensors only when TRITON_INTERPRET=1 was set before
this module was imported (Triton decides interpreter vs compiler when a kernel is decorated).
Plain torch.library.register_kernel, not torch.library.triton_op: triton_op's fake/compile path
runs the kernel on fake tensors, which fails under the interpreter.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .. import ops as _lori_ops  # noqa: F401  (loads lori_kernels._C: the op schemas)
from .. import spec
from ..packing import unpack_mask, validate_packed
from . import batched_delta as _batched
from . import merge_delta as _merge
from . import random_a as _random_a
from . import sparse_delta_bwd as _bwd
from . import sparse_delta_fwd as _fwd

INTERPRET = bool(_fwd.INTERPRET)  # the kernels were decorated for the interpreter
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MAX_IN = (1 << 31) - 1


def _check_runnable(op: str, t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu":
        if INTERPRET:
            return
        raise RuntimeError(
            f"{op}: the Triton kernels run on CPU tensors only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 in the environment before lori_kernels.triton is first imported "
            "(or pass CUDA tensors)")
    raise RuntimeError(f"{op}: Triton kernels need CUDA (or CPU with TRITON_INTERPRET=1) "
                       f"tensors, got device {t.device}")


def _check_distribution(op: str, distribution: str) -> None:
    if distribution not in spec.DISTRIBUTIONS:
        raise ValueError(f"{op}: distribution must be 'rademacher' or 'uniform', got "
                         f"{distribution!r}")


def _validate_contents(t: torch.Tensor) -> bool:
    """Full mask/offsets/values consistency reads the tensors on the host: always done for CPU
    tensors; on CUDA only with LORI_TRITON_VALIDATE=1 (it synchronizes). Unvalidated kernels still
    never read outside `values`."""
    return t.device.type == "cpu" or os.environ.get("LORI_TRITON_VALIDATE", "0") == "1"


def _check_delta(op: str, x, mask, values, offsets, rank, distribution, xn: str = "x") -> None:
    """Argument checks shared by the single-adapter ops; xn names x's role (merge: weight)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= spec.MAX_RANK:
        raise ValueError(f"{op}: rank must be in [1, {spec.MAX_RANK}], got {rank!r}")
    _check_distribution(op, distribution)
    if x.dim() < 1:
        raise ValueError(f"{op}: {xn} must have at least 1 dimension (..., in_features)")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {xn} must be float32, bfloat16, float16 or float64, got "
                        f"{x.dtype}")
    if not 1 <= x.shape[-1] <= _MAX_IN:
        raise ValueError(f"{op}: in_features ({xn}.shape[-1]) must be in [1, 2^31), got "
                         f"{x.shape[-1]}")
    for name, t in (("mask", mask), ("values", values), ("offsets", offsets)):
        if t.device != x.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {xn} is on {x.device}; move "
                               "them to the same device")
    if mask.dtype != torch.int32:
        raise TypeError(f"{op}: mask must be int32, got {mask.dtype}")
    words = spec.mask_words(rank)
    if mask.dim() != 2 or mask.shape[1] != words:
        raise ValueError(f"{op}: mask must have shape (out_features, {words}) for rank {rank}, "
                         f"got {tuple(mask.shape)}")
    if values.dtype != x.dtype:
        raise TypeError(f"{op}: values dtype ({values.dtype}) must match {xn} dtype ({x.dtype})")
    if values.dim() != 1:
        raise ValueError(f"{op}: values must be 1-D (nnz,), got {tuple(values.shape)}")
    if offsets.dtype != torch.int32:
        raise TypeError(f"{op}: offsets must be int32, got {offsets.dtype}")
    n_off = spec.num_chunks(mask.shape[0]) + 1
    if offsets.dim() != 1 or offsets.shape[0] != n_off:
        raise ValueError(f"{op}: offsets must have shape ({n_off},) for out_features "
                         f"{mask.shape[0]}, got {tuple(offsets.shape)}")
    if values.numel() > mask.shape[0] * rank:
        raise ValueError(f"{op}: values has {values.numel()} entries, more than out_features * "
                         f"rank = {mask.shape[0] * rank}")
    if _validate_contents(x):
        try:
            validate_packed(mask, values, offsets, rank)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{op}: inconsistent B (mask/values/offsets): {e}") from e
    _check_runnable(op, x)


def _on(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _b(mask, values, offsets):
    return mask.contiguous(), values.contiguous(), offsets.contiguous()


# ---- kernels ----------------------------------------------------------------------------------

@torch.library.register_kernel("lori::triton_sparse_delta", ("cpu", "cuda"))
def _triton_sparse_delta(x, mask, values, offsets, rank, seed, distribution, scale):
    _check_delta("triton_sparse_delta", x, mask, values, offsets, rank, distribution)
    with _on(x):
        return _fwd.sparse_delta_fwd(x, *_b(mask, values, offsets), rank, seed, distribution,
                                     float(scale), INTERPRET)


@torch.library.register_kernel("lori::triton_sparse_delta_backward", ("cpu", "cuda"))
def _triton_sparse_delta_backward(grad_y, x, mask, values, offsets, rank, seed, distribution,
                                  scale, need_x, need_values):
    op = "triton_sparse_delta_backward"
    _check_delta(op, x, mask, values, offsets, rank, distribution)
    if grad_y.device != x.device:
        raise RuntimeError(f"{op}: grad_y is on {grad_y.device} but x is on {x.device}")
    if grad_y.dtype != x.dtype:
        raise TypeError(f"{op}: grad_y dtype ({grad_y.dtype}) must match x dtype ({x.dtype})")
    expect = (*x.shape[:-1], mask.shape[0])
    if tuple(grad_y.shape) != expect:
        raise ValueError(f"{op}: grad_y must have shape {expect}, got {tuple(grad_y.shape)}")
    with _on(x):
        return _bwd.sparse_delta_bwd(grad_y, x, *_b(mask, values, offsets), rank, seed,
                                     distribution, float(scale), bool(need_x), bool(need_values),
                                     INTERPRET)


@torch.library.register_kernel("lori::triton_random_a_fill", ("cpu", "cuda"))
def _triton_random_a_fill(out, seed, in_features, col_start, distribution):
    op = "triton_random_a_fill"
    _check_distribution(op, distribution)
    if out.dim() != 2:
        raise ValueError(f"{op}: out must be 2-D (rank, columns), got {tuple(out.shape)}")
    if out.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: out must be float32, float64, bfloat16 or float16, got "
                        f"{out.dtype}")
    if not 1 <= in_features <= _MAX_IN:
        raise ValueError(f"{op}: in_features must be in [1, 2^31), got {in_features}")
    if not (0 <= col_start and col_start + out.shape[1] <= in_features):
        raise ValueError(f"{op}: columns [{col_start}, {col_start + out.shape[1]}) exceed "
                         f"in_features={in_features}")
    _check_runnable(op, out)
    with _on(out):
        _random_a.random_a_fill(out, seed, in_features, col_start, distribution, INTERPRET)


def _check_merge(op, weight, mask, values, offsets, rank, distribution) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D (out_features, in_features), got "
                         f"{tuple(weight.shape)}")
    _check_delta(op, weight, mask, values, offsets, rank, distribution, xn="weight")
    if weight.shape[0] != mask.shape[0]:
        raise ValueError(f"{op}: weight has {weight.shape[0]} rows but mask has out_features = "
                         f"{mask.shape[0]}")


@torch.library.register_kernel("lori::triton_merge_delta_", ("cpu", "cuda"))
def _triton_merge_delta_(weight, mask, values, offsets, rank, seed, distribution, scale):
    _check_merge("triton_merge_delta_", weight, mask, values, offsets, rank, distribution)
    with _on(weight):
        _merge.merge_delta_(weight, *_b(mask, values, offsets), rank, seed, distribution,
                            float(scale), INTERPRET)


# ---- batched multi-adapter ops ------------------------------------------------------------------

def _check_batched(op, x, ids, masks, values, value_starts, offsets, seeds, scales,
                   distributions, rank) -> None:
    """Shapes, dtypes and devices, as csrc/batched_checks.cpp (nothing read from the tensors)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= spec.MAX_RANK:
        raise ValueError(f"{op}: rank must be in [1, {spec.MAX_RANK}], got {rank!r}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimension (..., in_features)")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    for name, t in (("adapter_ids", ids), ("masks", masks), ("values", values),
                    ("value_starts", value_starts), ("offsets", offsets), ("seeds", seeds),
                    ("scales", scales), ("distributions", distributions)):
        if t.device != x.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but x is on {x.device}; move the "
                               "pool (AdapterPool.to) and the ids to x's device")
    if not 1 <= x.shape[-1] <= _MAX_IN:
        raise ValueError(f"{op}: in_features must be in [1, 2^31), got {x.shape[-1]}")
    tokens = x.numel() // x.shape[-1]
    if tokens >= 1 << 31:
        raise ValueError(f"{op}: at most 2^31 - 1 tokens per call, got {tokens}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: adapter_ids must be int32 or int64, got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != tokens:
        raise ValueError(f"{op}: adapter_ids must have shape ({tokens},) (one id per token of x), "
                         f"got {tuple(ids.shape)}")
    words = spec.mask_words(rank)
    if masks.dtype != torch.int32:
        raise TypeError(f"{op}: masks must be int32, got {masks.dtype}")
    if masks.dim() != 3 or masks.shape[2] != words:
        raise ValueError(f"{op}: masks must have shape (adapters, out_features, {words}) for rank "
                         f"{rank} (every adapter of a pool has the same rank), got "
                         f"{tuple(masks.shape)}")
    n, out = masks.shape[0], masks.shape[1]
    if values.dtype != x.dtype:
        raise TypeError(f"{op}: values dtype ({values.dtype}) must match x dtype ({x.dtype})")
    if values.dim() != 1:
        raise ValueError(f"{op}: values must be 1-D, got {tuple(values.shape)}")
    if offsets.dtype != torch.int32:
        raise TypeError(f"{op}: offsets must be int32, got {offsets.dtype}")
    n_off = spec.num_chunks(out) + 1
    if offsets.dim() != 2 or tuple(offsets.shape) != (n, n_off):
        raise ValueError(f"{op}: offsets must have shape ({n}, {n_off}) for out_features {out}, "
                         f"got {tuple(offsets.shape)}")
    for name, t, dt in (("value_starts", value_starts, torch.int64), ("seeds", seeds, torch.int64),
                        ("scales", scales, torch.float32),
                        ("distributions", distributions, torch.int32)):
        if t.dtype != dt:
            raise TypeError(f"{op}: {name} must be {dt}, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{op}: {name} must have shape ({n},) (one per adapter), got "
                             f"{tuple(t.shape)}")
    _check_runnable(op, x)


def _checks_enabled() -> bool:
    return os.environ.get("LORI_TRITON_BATCHED_CHECKS", "1") != "0"


def _check_batched_contents(op, ids, masks, values, value_starts, offsets, distributions,
                            rank) -> None:
    """Ids in [-1, N) and each used adapter's value extent and distribution, as the C++ op.

    Computed with device-side reductions and read back with ONE host sync (a no-op for CPU
    tensors). LORI_TRITON_BATCHED_CHECKS=0 skips it (and the sync: e.g. for CUDA graph
    capture); the kernels still never read out of bounds (bad ids are treated as -1, extents
    clamped). The error path may sync more to build its message. Each used adapter's
    mask/offsets consistency is checked for CPU tensors, and on CUDA with LORI_TRITON_VALIDATE=1."""
    T, n, C = ids.numel(), masks.shape[0], offsets.shape[1] - 1
    if T == 0:
        return
    if _checks_enabled():
        ids64 = ids.long()
        used = ids64 >= 0
        a = ids64.clamp(0, max(n - 1, 0))
        if n > 0:
            nnz, vs, d = offsets[a, C].long(), value_starts[a], distributions[a]
            bad = used & ((offsets[a, 0] != 0) | (vs < 0) | (nnz < 0) | (nnz > values.numel())
                          | (vs > values.numel() - nnz) | ((d != 1) & (d != 2)))
            first_bad = torch.where(bad, ids64, n).min()
        else:
            first_bad = torch.tensor(n, device=ids.device)
        lo, hi = torch.aminmax(ids64)
        lo, hi, first_bad = torch.stack([lo, hi, first_bad]).tolist()   # the one sync
        if lo < -1 or hi >= n:
            t = int(((ids64 < -1) | (ids64 >= n)).nonzero()[0, 0])
            raise ValueError(f"{op}: adapter_ids[{t}] = {int(ids64[t])} is out of range for a "
                             f"pool of {n} adapters (valid: -1 for none, 0..{n - 1})")
        if first_bad < n:
            _raise_bad_adapter(op, first_bad, values.numel(), value_starts, offsets,
                               distributions)
    if ids.device.type == "cpu" or os.environ.get("LORI_TRITON_VALIDATE", "0") == "1":
        used = torch.unique(ids[(ids >= 0) & (ids < n)].long())  # as the kernels see them
        _check_used_bitmasks(op, used, masks, offsets, rank)


def _raise_bad_adapter(op, a, n_values, value_starts, offsets, distributions):
    off = offsets[a].tolist()
    vs, nnz, d = int(value_starts[a]), off[-1], int(distributions[a])
    if off[0] != 0:
        raise ValueError(f"{op}: offsets[{a}, 0] must be 0, got {off[0]}")
    if not (vs >= 0 and 0 <= nnz <= n_values and vs <= n_values - nnz):
        raise ValueError(f"{op}: adapter {a}'s values [{vs}, {vs + nnz}) do not lie within the "
                         f"values buffer ({n_values} entries)")
    raise ValueError(f"{op}: distributions[{a}] = {d} is not 1 (rademacher) or 2 (uniform)")


def _check_used_bitmasks(op, used, masks, offsets, rank) -> None:
    """Every used adapter's mask has no bits at or past rank and matches its offsets."""
    if used.numel() == 0:
        return
    m = unpack_mask(masks[used], spec.mask_words(rank) * 32)        # (U, out, 32 W) bool
    stray = m[:, :, rank:].flatten(1).any(1)
    out = masks.shape[1]
    counts = torch.zeros(used.numel(), spec.num_chunks(out) * spec.ROW_CHUNK, dtype=torch.int64,
                         device=masks.device)
    counts[:, :out] = m[:, :, :rank].sum(2)
    expect = torch.zeros(used.numel(), spec.num_chunks(out) + 1, dtype=torch.int64,
                         device=masks.device)
    expect[:, 1:] = counts.view(used.numel(), -1, spec.ROW_CHUNK).sum(2).cumsum(1)
    bad = stray | (expect != offsets[used].long()).any(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        what = (f"mask has bits set at positions >= rank ({rank})" if bool(stray[i])
                else "offsets do not match the mask's chunk popcounts")
        raise ValueError(f"{op} (adapter {int(used[i])}): {what}")


def _pool(masks, values, value_starts, offsets, seeds, scales, distributions):
    return (masks.contiguous(), values.contiguous(), value_starts.contiguous(),
            offsets.contiguous(), seeds.contiguous(), scales.contiguous(),
            distributions.contiguous())


@torch.library.register_kernel("lori::triton_batched_sparse_delta", ("cpu", "cuda"))
def _triton_batched_sparse_delta(x, adapter_ids, masks, values, value_starts, offsets, seeds,
                                 scales, distributions, rank, base=None):
    op = "triton_batched_sparse_delta"
    _check_batched(op, x, adapter_ids, masks, values, value_starts, offsets, seeds, scales,
                   distributions, rank)
    if base is not None:
        _check_out_like(op, "base", base, x, masks.shape[1])
    _check_batched_contents(op, adapter_ids, masks, values, value_starts, offsets, distributions,
                            rank)
    pool = _pool(masks, values, value_starts, offsets, seeds, scales, distributions)
    with _on(x):
        return _batched.batched_fwd(x, adapter_ids, *pool, rank, base, INTERPRET)


@torch.library.register_kernel("lori::triton_batched_sparse_delta_backward", ("cpu", "cuda"))
def _triton_batched_sparse_delta_backward(grad_y, x, adapter_ids, masks, values, value_starts,
                                          offsets, seeds, scales, distributions, rank, need_x,
                                          need_values):
    op = "triton_batched_sparse_delta_backward"
    _check_batched(op, x, adapter_ids, masks, values, value_starts, offsets, seeds, scales,
                   distributions, rank)
    _check_out_like(op, "grad_y", grad_y, x, masks.shape[1])
    _check_batched_contents(op, adapter_ids, masks, values, value_starts, offsets, distributions,
                            rank)
    pool = _pool(masks, values, value_starts, offsets, seeds, scales, distributions)
    with _on(x):
        return _batched.batched_bwd(grad_y, x, adapter_ids, *pool, rank, bool(need_x),
                                    bool(need_values), INTERPRET)


def _check_out_like(op, name, t, x, out) -> None:
    if t.device != x.device:
        raise RuntimeError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} dtype ({t.dtype}) must match x dtype ({x.dtype})")
    expect = (*x.shape[:-1], out)
    if tuple(t.shape) != expect:
        raise ValueError(f"{op}: {name} must have shape {expect}, got {tuple(t.shape)}")


# ---- fake kernels -------------------------------------------------------------------------------

def _check_delta_fake(op, x, mask, values, offsets, rank):
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least 1 dimension")
    torch._check(1 <= rank <= spec.MAX_RANK, lambda: f"{op}: rank out of range: {rank}")
    torch._check(mask.dim() == 2 and mask.shape[1] == spec.mask_words(rank),
                 lambda: f"{op}: mask must have shape (out_features, ceil(rank/32))")
    torch._check(mask.dtype == torch.int32, lambda: f"{op}: mask must be int32")
    torch._check(values.dtype == x.dtype, lambda: f"{op}: values dtype must match x")
    torch._check(values.dim() == 1, lambda: f"{op}: values must be 1-D")
    torch._check(offsets.dtype == torch.int32, lambda: f"{op}: offsets must be int32")
    torch._check(offsets.dim() == 1 and offsets.shape[0] == spec.num_chunks(mask.shape[0]) + 1,
                 lambda: f"{op}: offsets must have shape (ceil(out_features/64)+1,)")


@torch.library.register_fake("lori::triton_sparse_delta")
def _triton_sparse_delta_fake(x, mask, values, offsets, rank, seed, distribution, scale):
    _check_delta_fake("triton_sparse_delta", x, mask, values, offsets, rank)
    return x.new_empty((*x.shape[:-1], mask.shape[0]))


@torch.library.register_fake("lori::triton_sparse_delta_backward")
def _triton_sparse_delta_backward_fake(grad_y, x, mask, values, offsets, rank, seed,
                                       distribution, scale, need_x, need_values):
    op = "triton_sparse_delta_backward"
    _check_delta_fake(op, x, mask, values, offsets, rank)
    torch._check(grad_y.shape == (*x.shape[:-1], mask.shape[0]),
                 lambda: f"{op}: grad_y shape mismatch")
    gx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
    gv = values.new_empty(values.shape) if need_values else values.new_empty((0,))
    return gx, gv


@torch.library.register_fake("lori::triton_random_a_fill")
def _triton_random_a_fill_fake(out, seed, in_features, col_start, distribution):
    return None


@torch.library.register_fake("lori::triton_merge_delta_")
def _triton_merge_delta_fake(weight, mask, values, offsets, rank, seed, distribution, scale):
    op = "triton_merge_delta_"
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be 2-D (out_features, in_features)")
    _check_delta_fake(op, weight, mask, values, offsets, rank)
    torch._check(weight.shape[0] == mask.shape[0],
                 lambda: f"{op}: weight rows must equal mask's out_features")
    return None


# ---- autograd: gradients for x and values; A is frozen ------------------------------------------

def _setup_context(ctx, inputs, output):
    x, mask, values, offsets, rank, seed, distribution, scale = inputs
    ctx.save_for_backward(x, mask, values, offsets)
    ctx.args = (rank, seed, distribution, scale)


def _backward(ctx, grad_y):
    x, mask, values, offsets = ctx.saved_tensors
    need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_x or need_values):
        return (None,) * 8
    gx, gv = torch.ops.lori.triton_sparse_delta_backward(
        grad_y.contiguous(), x, mask, values, offsets, *ctx.args, need_x, need_values)
    return (gx if need_x else None, None, gv if need_values else None, None, None, None, None,
            None)


torch.library.register_autograd("lori::triton_sparse_delta", _backward,
                                setup_context=_setup_context)


# ---- batched: fakes and autograd (x, values and base get gradients) ---------------------------

@torch.library.register_fake("lori::triton_batched_sparse_delta")
def _triton_batched_sparse_delta_fake(x, adapter_ids, masks, values, value_starts, offsets,
                                      seeds, scales, distributions, rank, base=None):
    op = "triton_batched_sparse_delta"
    _lori_ops._check_batched_fake(op, x, adapter_ids, masks, values, value_starts, offsets,
                                  seeds, scales, distributions, rank)
    shape = (*x.shape[:-1], masks.shape[1])
    if base is not None:
        torch._check(base.shape == shape and base.dtype == x.dtype,
                     lambda: f"{op}: base must match (..., out_features), x dtype")
    return x.new_empty(shape)


@torch.library.register_fake("lori::triton_batched_sparse_delta_backward")
def _triton_batched_sparse_delta_backward_fake(grad_y, x, adapter_ids, masks, values,
                                               value_starts, offsets, seeds, scales,
                                               distributions, rank, need_x, need_values):
    op = "triton_batched_sparse_delta_backward"
    _lori_ops._check_batched_fake(op, x, adapter_ids, masks, values, value_starts, offsets,
                                  seeds, scales, distributions, rank)
    torch._check(grad_y.shape == (*x.shape[:-1], masks.shape[1]),
                 lambda: f"{op}: grad_y shape mismatch")
    gx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
    gv = values.new_empty(values.shape) if need_values else values.new_empty((0,))
    return gx, gv


def _batched_setup_context(ctx, inputs, output):
    x, ids, masks, values, value_starts, offsets, seeds, scales, dists, rank, base = inputs
    ctx.save_for_backward(x, ids, masks, values, value_starts, offsets, seeds, scales, dists)
    ctx.rank = rank
    ctx.has_base = base is not None


def _batched_backward(ctx, grad_y):
    # Input order: x 0, adapter_ids 1, masks 2, values 3, ..., rank 9, base 10.
    need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    need_base = ctx.has_base and ctx.needs_input_grad[10]
    gx = gv = None
    if need_x or need_values:
        gx, gv = torch.ops.lori.triton_batched_sparse_delta_backward(
            grad_y.contiguous(), *ctx.saved_tensors, ctx.rank, need_x, need_values)
    return (gx if need_x else None, None, None, gv if need_values else None, None, None, None,
            None, None, None, grad_y if need_base else None)


torch.library.register_autograd("lori::triton_batched_sparse_delta", _batched_backward,
                                setup_context=_batched_setup_context)

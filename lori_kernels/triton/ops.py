"""Registers the Triton kernels for lori::triton_sparse_delta, lori::triton_sparse_delta_backward,
lori::triton_random_a_fill and lori::triton_merge_delta_ (schemas in csrc/ops.cpp; same
semantics as sparse_delta, sparse_delta_backward, _random_a_fill and merge_delta_), with fake
kernels and autograd.

  triton_sparse_delta:   y = scale * (x @ A^T) @ B^T, A (rank, in) from (seed, distribution),
                         B (out, rank) = (mask, values, offsets); y in x's dtype.
  triton_sparse_delta_backward: (grad_x, grad_values) = (scale * (gy @ B) @ A,
                         scale * sum_t gy[t, o] h[t, k] per pattern entry), h = x @ A^T.
  triton_random_a_fill:  out[r, c] = A[r, col_start + c] (in place).
  triton_merge_delta_:   weight (out, in) += scale * B @ A (in place; unmerge: -scale).

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
from ..packing import validate_packed
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

"""The op library: loads lori_kernels._C (every schema of torch.ops.lori.*, the C++ CPU kernels
and, when built, the CUDA ones) and registers every op's fake kernel.

Fake kernels compute output shapes for torch.compile, opcheck and meta tensors. Each checks
its arguments with lori_kernels.rules (the same rules as the C++ kernels and the Triton host
code): a meta tensor mixed with real ones lands here, and must raise rather than return
uninitialised memory. The triton_* ops share their C++ twin's fake (same schema, same rules,
their own op name in messages). Autograd of the C++ ops is registered in C++
(csrc/autograd*.cpp); the Triton ops' autograd in lori_kernels/triton/ops.py.
"""
from __future__ import annotations

import torch

from . import rules, spec

try:
    from . import _C  # noqa: F401  (loading the .so registers torch.ops.lori.*)
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "lori_kernels._C is not built: run `make build` (or `pip install --no-build-isolation "
        f"-e .`) in the repository first ({e})"
    ) from e


def _h_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _grads(x, values, need_x, need_values):
    gx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
    gv = values.new_empty(values.shape) if need_values else values.new_empty((0,))
    return gx, gv


def _register_single(prefix: str) -> None:
    op = f"{prefix}sparse_delta"

    @torch.library.register_fake(f"lori::{op}")
    def _delta(x, mask, values, offsets, rank, seed, distribution, scale, col_start=0,
               in_features=-1):
        rules.sparse_delta(op, x, mask, values, offsets, rank, distribution, scale,
                           col_start=col_start, n_in=in_features)
        return x.new_empty((*x.shape[:-1], mask.shape[0]))

    bop = f"{prefix}sparse_delta_backward"
    if prefix:
        @torch.library.register_fake(f"lori::{bop}")
        def _backward(grad_y, x, mask, values, offsets, rank, seed, distribution, scale, need_x,
                      need_values, col_start=0, in_features=-1):
            rules.sparse_delta(bop, x, mask, values, offsets, rank, distribution, scale,
                               col_start=col_start, n_in=in_features)
            rules.like_output(bop, "grad_y", grad_y, x, mask.shape[0])
            return _grads(x, values, need_x, need_values)
    else:
        @torch.library.register_fake(f"lori::{bop}")
        def _backward(grad_y, x, mask, values, offsets, rank, seed, distribution, scale, need_x,
                      need_values, h=None, col_start=0, in_features=-1):
            rules.sparse_delta(bop, x, mask, values, offsets, rank, distribution, scale,
                               col_start=col_start, n_in=in_features)
            rules.like_output(bop, "grad_y", grad_y, x, mask.shape[0])
            rules.saved_h(bop, h, x, rank)
            return _grads(x, values, need_x, need_values)

    mop = f"{prefix}merge_delta_"

    @torch.library.register_fake(f"lori::{mop}")
    def _merge(weight, mask, values, offsets, rank, seed, distribution, scale, col_start=0,
               in_features=-1):
        rules.merge(mop, weight, mask, values, offsets, rank, distribution, scale, col_start,
                    in_features)
        return None

    sop = f"{prefix}shrink"

    @torch.library.register_fake(f"lori::{sop}")
    def _shrink(x, rank, seed, distribution, col_start=0, in_features=-1):
        rules.shrink(sop, x, rank, distribution, col_start, in_features)
        return x.new_empty((*x.shape[:-1], rank), dtype=_h_dtype(x))

    sbop = f"{prefix}shrink_backward"

    @torch.library.register_fake(f"lori::{sbop}")
    def _shrink_backward(grad_h, width, dtype, rank, seed, distribution, col_start=0,
                         in_features=-1):
        rules.shrink_backward(sbop, grad_h, width, dtype, rank, distribution, col_start,
                              in_features)
        return grad_h.new_empty((*grad_h.shape[:-1], width), dtype=dtype)

    eop = f"{prefix}expand"

    @torch.library.register_fake(f"lori::{eop}")
    def _expand(h, mask, values, offsets, scale):
        rules.expand(eop, h, mask, values, offsets, scale)
        return h.new_empty((*h.shape[:-1], mask.shape[0]), dtype=values.dtype)

    ebop = f"{prefix}expand_backward"

    @torch.library.register_fake(f"lori::{ebop}")
    def _expand_backward(grad_y, h, mask, values, offsets, scale, need_h, need_values):
        rules.expand(ebop, h, mask, values, offsets, scale)
        rules.expand_grad_y(ebop, grad_y, h, values, mask.shape[0])
        gh = h.new_empty(h.shape) if need_h else h.new_empty((0,))
        gv = values.new_empty(values.shape) if need_values else values.new_empty((0,))
        return gh, gv


def _register_batched(prefix: str) -> None:
    op = f"{prefix}batched_sparse_delta"

    @torch.library.register_fake(f"lori::{op}")
    def _fwd(x, adapter_ids, masks, values, value_starts, offsets, seeds, scales, distributions,
             rank, base=None, plan_order=None, plan_starts=None, plan_adapters=None):
        rules.batched(op, x, adapter_ids, masks, values, value_starts, offsets, seeds, scales,
                      distributions, rank)
        rules.batched_plan(op, x, plan_order, plan_starts, plan_adapters)
        if base is not None:
            rules.like_output(op, "base", base, x, masks.shape[1])
        return x.new_empty((*x.shape[:-1], masks.shape[1]))

    bop = f"{prefix}batched_sparse_delta_backward"

    @torch.library.register_fake(f"lori::{bop}")
    def _bwd(grad_y, x, adapter_ids, masks, values, value_starts, offsets, seeds, scales,
             distributions, rank, need_x, need_values, plan_order=None, plan_starts=None,
             plan_adapters=None):
        rules.batched(bop, x, adapter_ids, masks, values, value_starts, offsets, seeds, scales,
                      distributions, rank)
        rules.like_output(bop, "grad_y", grad_y, x, masks.shape[1])
        rules.batched_plan(bop, x, plan_order, plan_starts, plan_adapters)
        return _grads(x, values, need_x, need_values)


for _prefix in ("", "triton_"):
    _register_single(_prefix)
    _register_batched(_prefix)


@torch.library.register_fake("lori::sparse_delta_fwd")
def _sparse_delta_fwd_fake(x, mask, values, offsets, rank, seed, distribution, scale, col_start=0,
                           in_features=-1):
    rules.sparse_delta("sparse_delta_fwd", x, mask, values, offsets, rank, distribution, scale,
                       col_start=col_start, n_in=in_features)
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.new_empty((*x.shape[:-1], mask.shape[0])),
            x.new_empty((tokens, rank), dtype=_h_dtype(x)))


@torch.library.register_fake("lori::random_a")
def _random_a_fake(seed, rank, in_features, distribution="rademacher", col_start=0, col_end=-1,
                   *, dtype=None, device=None):
    rules.random_a_args("random_a", rank, in_features, distribution, col_start, col_end)
    end = in_features if col_end < 0 else col_end
    return torch.empty((rank, end - col_start), dtype=dtype or torch.float32,
                       device=device or "cpu")


@torch.library.register_fake("lori::_random_a_fill")
def _random_a_fill_fake(out, seed, in_features, col_start, distribution):
    rules.random_a_out("_random_a_fill", out, in_features, col_start, distribution)
    return None


@torch.library.register_fake("lori::triton_random_a_fill")
def _triton_random_a_fill_fake(out, seed, in_features, col_start, distribution):
    rules.random_a_out("triton_random_a_fill", out, in_features, col_start, distribution)
    return None


@torch.library.register_fake("lori::philox4x32_10")
def _philox_fake(counters, seed):
    return torch.empty_like(counters)


ops = torch.ops.lori
__all__ = ["ops", "spec"]

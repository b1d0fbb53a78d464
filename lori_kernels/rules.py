"""The argument rules of the lori ops, written once for Python (data-free: shapes, dtypes,
devices, scalar ranges; nothing is read from a tensor's storage).

Two callers share them: every op's fake kernel (lori_kernels._library, used by torch.compile,
opcheck and meta tensors) and the Triton backend's host-side checks (lori_kernels.triton).
The C++/CUDA backends hold the same rules in csrc/checks.cpp and csrc/batched_checks.cpp with
the same messages and exception types; tests assert every backend raises alike.

The checks go through torch._check_value / _check_type / _check, so they raise ValueError /
TypeError / RuntimeError on real tensors and become guards or deferred asserts on symbolic
shapes inside a compiled graph. Messages are lambdas: nothing is formatted on the happy path.

Devices: every tensor argument must be on x's device. A meta tensor among real ones sends the
call to the fake kernel, which without this rule would return uninitialised memory.
"""
from __future__ import annotations

import math

import torch

from . import spec

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_IN = (1 << 31) - 1        # in_features: counters hold column indices in 31 bits
MAX_TOKENS = (1 << 31) - 1    # batched ops: token indices in int32
_FP32_MAX = float(torch.finfo(torch.float32).max)
_FP32_TINY = float(torch.finfo(torch.float32).tiny)


def _value(cond, msg):
    torch._check_value(cond, msg)


def _type(cond, msg):
    torch._check_type(cond, msg)


def rank(op: str, r) -> None:
    _value(not isinstance(r, bool) and isinstance(r, int) and 1 <= r <= spec.MAX_RANK,
           lambda: f"{op}: rank must be in [1, {spec.MAX_RANK}], got {r!r}")


def distribution(op: str, d) -> int:
    """The distribution's id (spec_a), or ValueError."""
    did = spec.DISTRIBUTIONS.get(d) if isinstance(d, str) else None
    _value(did is not None,
           lambda: f"{op}: distribution must be 'rademacher' or 'uniform', got {d!r}")
    return did


def scale(op: str, s, dtype: torch.dtype) -> None:
    """scale is applied in the accumulation dtype (fp64 for fp64 inputs, else fp32): it must be
    finite there, and a nonzero scale must not flush to zero (or to a subnormal's few bits)."""
    if isinstance(s, torch.SymFloat):  # traced: checked when the real call runs
        return
    s = float(s)
    ok = math.isfinite(s)
    if ok and dtype != torch.float64:
        ok = s == 0.0 or _FP32_TINY <= abs(s) <= _FP32_MAX
    _value(ok, lambda: f"{op}: scale must be finite and representable in the accumulation "
                       f"dtype ({'float64' if dtype == torch.float64 else 'float32'}), got {s!r}")


def same_device(op: str, x: torch.Tensor, named, xn: str = "x") -> None:
    for name, t in named:
        torch._check(t.device == x.device,
                     lambda: f"{op}: {name} is on {t.device} but {xn} is on {x.device}; move "
                             "them to the same device")


def float_input(op: str, x: torch.Tensor, xn: str = "x") -> None:
    _value(x.dim() >= 1, lambda: f"{op}: {xn} must have at least 1 dimension (..., in_features)")
    _type(x.dtype in FLOAT_DTYPES,
          lambda: f"{op}: {xn} must be float32, bfloat16, float16 or float64, got {x.dtype}")


def in_features(op: str, n) -> None:
    _value(1 <= n <= MAX_IN, lambda: f"{op}: in_features must be in [1, 2^31), got {n}")


def packed_b(op: str, x: torch.Tensor, mask, values, offsets, r, xn: str = "x") -> None:
    """One adapter's B (mask, values, offsets) for input x (or weight, named by xn)."""
    words = spec.mask_words(r)
    _type(mask.dtype == torch.int32, lambda: f"{op}: mask must be int32, got {mask.dtype}")
    _value(mask.dim() == 2 and mask.shape[1] == words,
           lambda: f"{op}: mask must have shape (out_features, {words}) for rank {r}, got "
                   f"{tuple(mask.shape)}")
    _type(values.dtype == x.dtype,
          lambda: f"{op}: values dtype ({values.dtype}) must match {xn} dtype ({x.dtype})")
    _value(values.dim() == 1, lambda: f"{op}: values must be 1-D (nnz,), got "
                                      f"{tuple(values.shape)}")
    _type(offsets.dtype == torch.int32,
          lambda: f"{op}: offsets must be int32, got {offsets.dtype}")
    out = mask.shape[0]
    n_off = spec.num_chunks(out) + 1
    _value(offsets.dim() == 1 and offsets.shape[0] == n_off,
           lambda: f"{op}: offsets must have shape ({n_off},) for out_features {out}, got "
                   f"{tuple(offsets.shape)}")
    _value(values.shape[0] <= out * r,
           lambda: f"{op}: values has {values.shape[0]} entries, more than out_features * rank "
                   f"= {out * r}")


def window(op: str, col_start, width, n_in) -> int:
    """A column window: x holds A's columns [col_start, col_start + width) of an A n_in wide
    (-1: width, the unsharded call). Returns the whole A's in_features."""
    _value(n_in == -1 or n_in >= 1,
           lambda: f"{op}: in_features must be >= 1 (A's full width), or -1 for x's width; got "
                   f"{n_in}")
    n = width if n_in == -1 else n_in
    in_features(op, n)
    _value(col_start >= 0, lambda: f"{op}: col_start must be >= 0, got {col_start}")
    _value(col_start <= n - width,
           lambda: f"{op}: col_start + width = {col_start} + {width} exceeds in_features = {n} "
                   "(x holds A's columns [col_start, col_start + x.size(-1)))")
    return n


def sparse_delta(op: str, x, mask, values, offsets, r, dist, s, xn: str = "x",
                 col_start=0, n_in=-1) -> None:
    """The single-adapter ops' arguments (sparse_delta, its fwd/backward, merge_delta_), with
    their column window (col_start, in_features)."""
    rank(op, r)
    float_input(op, x, xn)
    same_device(op, x, (("mask", mask), ("values", values), ("offsets", offsets)), xn)
    packed_b(op, x, mask, values, offsets, r, xn)
    distribution(op, dist)
    in_features(op, x.shape[-1])
    scale(op, s, x.dtype)
    window(op, col_start, x.shape[-1], n_in)


def shrink(op: str, x, r, dist, col_start, n_in) -> None:
    rank(op, r)
    float_input(op, x)
    in_features(op, x.shape[-1])
    distribution(op, dist)
    window(op, col_start, x.shape[-1], n_in)


def shrink_backward(op: str, grad_h, width, dtype, r, dist, col_start, n_in) -> None:
    rank(op, r)
    _type(dtype in FLOAT_DTYPES,
          lambda: f"{op}: dtype must be float32, bfloat16, float16 or float64, got {dtype}")
    in_features(op, width)
    _value(grad_h.dim() >= 1 and grad_h.shape[-1] == r,
           lambda: f"{op}: grad_h must have shape (..., rank = {r}), got {tuple(grad_h.shape)}")
    want = torch.float64 if dtype == torch.float64 else torch.float32
    _type(grad_h.dtype == want, lambda: f"{op}: grad_h must be {want}, got {grad_h.dtype}")
    distribution(op, dist)
    window(op, col_start, width, n_in)


def expand(op: str, h, mask, values, offsets, s) -> None:
    """expand / expand_backward: h (..., rank) in the accumulation dtype of values' dtype."""
    _value(h.dim() >= 1, lambda: f"{op}: h must have at least 1 dimension (..., rank)")
    r = h.shape[-1]  # a SymInt when traced with dynamic shapes: no isinstance check
    _value(1 <= r <= spec.MAX_RANK,
           lambda: f"{op}: rank must be in [1, {spec.MAX_RANK}], got {r!r}")
    _type(values.dtype in FLOAT_DTYPES,
          lambda: f"{op}: values must be float32, bfloat16, float16 or float64, got "
                  f"{values.dtype}")
    want = torch.float64 if values.dtype == torch.float64 else torch.float32
    _type(h.dtype == want,
          lambda: f"{op}: h must be {want} (the accumulation dtype of {values.dtype} values), "
                  f"got {h.dtype}")
    same_device(op, h, (("mask", mask), ("values", values), ("offsets", offsets)), "h")
    packed_b(op, values, mask, values, offsets, r, "the output")
    scale(op, s, values.dtype)


def like_output(op: str, name: str, t: torch.Tensor, x: torch.Tensor, out) -> None:
    """t (grad_y, base) must be (..., out_features) in x's dtype on x's device."""
    torch._check(t.device == x.device,
                 lambda: f"{op}: {name} is on {t.device} but x is on {x.device}")
    _type(t.dtype == x.dtype,
          lambda: f"{op}: {name} dtype ({t.dtype}) must match x dtype ({x.dtype})")
    expect = (*x.shape[:-1], out)
    _value(tuple(t.shape) == expect,
           lambda: f"{op}: {name} must have shape {expect}, got {tuple(t.shape)}")


def saved_h(op: str, h, x: torch.Tensor, r) -> None:
    """The forward's h = x A^T (tokens, rank) handed to a backward (empty: recompute)."""
    if h is None or h.numel() == 0:
        return
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    hdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    torch._check(h.device == x.device,
                 lambda: f"{op}: h is on {h.device} but x is on {x.device}")
    _value(h.dim() == 2 and h.shape[0] == tokens and h.shape[1] == r and h.dtype == hdt,
           lambda: f"{op}: h must be ({tokens}, {r}) {hdt} on x's device, got "
                   f"{tuple(h.shape)} {h.dtype}")


def expand_grad_y(op: str, grad_y, h, values, out) -> None:
    """expand_backward's grad_y: (*h.shape[:-1], out_features) in values' dtype, on h's device."""
    torch._check(grad_y.device == h.device,
                 lambda: f"{op}: grad_y is on {grad_y.device} but h is on {h.device}")
    _type(grad_y.dtype == values.dtype,
          lambda: f"{op}: grad_y dtype ({grad_y.dtype}) must match values dtype ({values.dtype})")
    expect = (*h.shape[:-1], out)
    _value(tuple(grad_y.shape) == expect,
           lambda: f"{op}: grad_y must have shape {expect}, got {tuple(grad_y.shape)}")


def merge(op: str, weight, mask, values, offsets, r, dist, s, col_start=0, n_in=-1) -> None:
    _value(weight.dim() == 2,
           lambda: f"{op}: weight must be 2-D (out_features, in_features), got "
                   f"{tuple(weight.shape)}")
    sparse_delta(op, weight, mask, values, offsets, r, dist, s, xn="weight",
                 col_start=col_start, n_in=n_in)
    _value(weight.shape[0] == mask.shape[0],
           lambda: f"{op}: weight has {weight.shape[0]} rows but mask has out_features = "
                   f"{mask.shape[0]}")


def random_a_out(op: str, out: torch.Tensor, n_in, col_start, dist) -> None:
    distribution(op, dist)
    _value(out.dim() == 2, lambda: f"{op}: out must be 2-D (rank, columns), got "
                                   f"{tuple(out.shape)}")
    _type(out.dtype in FLOAT_DTYPES,
          lambda: f"{op}: out must be float32, float64, bfloat16 or float16, got {out.dtype}")
    in_features(op, n_in)
    _value(0 <= col_start and col_start + out.shape[1] <= n_in,
           lambda: f"{op}: columns [{col_start}, {col_start + out.shape[1]}) exceed "
                   f"in_features={n_in}")


def random_a_args(op: str, r, n_in, dist, col_start, col_end) -> None:
    _value(not isinstance(r, bool) and isinstance(r, int) and r >= 0,
           lambda: f"{op}: rank must be a non-negative int, got {r!r}")
    in_features(op, n_in)
    distribution(op, dist)
    end = n_in if col_end < 0 else col_end
    _value(0 <= col_start <= end <= n_in,
           lambda: f"{op}: columns must satisfy 0 <= col_start <= col_end <= in_features="
                   f"{n_in}, got [{col_start}, {col_end})")


_POOL_META = (("value_starts", torch.int64), ("seeds", torch.int64), ("scales", torch.float32),
              ("distributions", torch.int32))


def batched(op: str, x, ids, masks, values, value_starts, offsets, seeds, scales,
            distributions, r) -> None:
    """The batched ops' arguments: x, one id per token, and the pool's tensors."""
    rank(op, r)
    float_input(op, x)
    torch_named = (("adapter_ids", ids), ("masks", masks), ("values", values),
                   ("value_starts", value_starts), ("offsets", offsets), ("seeds", seeds),
                   ("scales", scales), ("distributions", distributions))
    for name, t in torch_named:
        torch._check(t.device == x.device,
                     lambda: f"{op}: {name} is on {t.device} but x is on {x.device}; move the "
                             "pool (AdapterPool.to) and the ids to x's device")
    in_features(op, x.shape[-1])
    tokens = x.numel() // x.shape[-1]
    _value(tokens <= MAX_TOKENS, lambda: f"{op}: at most 2^31 - 1 tokens per call, got {tokens}")
    _type(ids.dtype in (torch.int32, torch.int64),
          lambda: f"{op}: adapter_ids must be int32 or int64, got {ids.dtype}")
    _value(ids.dim() == 1 and ids.shape[0] == tokens,
           lambda: f"{op}: adapter_ids must have shape ({tokens},) (one id per token of x), got "
                   f"{tuple(ids.shape)}")
    words = spec.mask_words(r)
    _type(masks.dtype == torch.int32, lambda: f"{op}: masks must be int32, got {masks.dtype}")
    _value(masks.dim() == 3 and masks.shape[2] == words,
           lambda: f"{op}: masks must have shape (adapters, out_features, {words}) for rank {r} "
                   f"(every adapter of a pool has the same rank), got {tuple(masks.shape)}")
    n, out = masks.shape[0], masks.shape[1]
    _type(values.dtype == x.dtype,
          lambda: f"{op}: values dtype ({values.dtype}) must match x dtype ({x.dtype})")
    _value(values.dim() == 1, lambda: f"{op}: values must be 1-D, got {tuple(values.shape)}")
    _type(offsets.dtype == torch.int32,
          lambda: f"{op}: offsets must be int32, got {offsets.dtype}")
    n_off = spec.num_chunks(out) + 1
    _value(offsets.dim() == 2 and tuple(offsets.shape) == (n, n_off),
           lambda: f"{op}: offsets must have shape ({n}, {n_off}) for out_features {out}, got "
                   f"{tuple(offsets.shape)}")
    for (name, dt), t in zip(_POOL_META, (value_starts, seeds, scales, distributions)):
        _type(t.dtype == dt, lambda: f"{op}: {name} must be {dt}, got {t.dtype}")
        _value(t.dim() == 1 and t.shape[0] == n,
               lambda: f"{op}: {name} must have shape ({n},) (one per adapter), got "
                       f"{tuple(t.shape)}")


def batched_plan(op: str, x, order, starts, adapters) -> None:
    """The batched ops' optional plan (all three or none; int32, on x's device): plan_order
    (T,), plan_starts (G + 1,), plan_adapters (G,). Its contents are checked against the ids
    under validation "full" only (lori_kernels.validation; docs/architecture.md)."""
    given = [t is not None for t in (order, starts, adapters)]
    if not any(given):
        return
    _value(all(given), lambda: f"{op}: plan_order, plan_starts and plan_adapters go together "
                               "(give all three or none)")
    named = (("plan_order", order), ("plan_starts", starts), ("plan_adapters", adapters))
    for name, t in named:
        torch._check(t.device == x.device,
                     lambda: f"{op}: {name} is on {t.device} but x is on {x.device}; build the "
                             "plan on x's device (AdapterPool.plan)")
    for name, t in named:
        _type(t.dtype == torch.int32, lambda: f"{op}: {name} must be int32, got {t.dtype}")
    tokens = x.numel() // x.shape[-1]
    _value(order.dim() == 1 and order.shape[0] == tokens,
           lambda: f"{op}: plan_order must have shape ({tokens},) (one entry per token of x), "
                   f"got {tuple(order.shape)}")
    _value(adapters.dim() == 1,
           lambda: f"{op}: plan_adapters must be 1-D, got {tuple(adapters.shape)}")
    g = adapters.shape[0]
    _value(starts.dim() == 1 and starts.shape[0] == g + 1,
           lambda: f"{op}: plan_starts must have shape ({g + 1},) (one more than plan_adapters), "
                   f"got {tuple(starts.shape)}")

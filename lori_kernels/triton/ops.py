"""Registers the Triton kernels of the lori ops (schemas in csrc/ops.cpp), with fake kernels and
autograd. Each triton_X has the semantics, argument checks and error messages of the C++ op X.

  triton_sparse_delta:   y = scale * (x @ A^T) @ B^T, A (rank, in) from (seed, distribution),
                         B (out, rank) = (mask, values, offsets); y in x's dtype.
  triton_sparse_delta_backward: (grad_x, grad_values) = (scale * (gy @ B) @ A,
                         scale * sum_t gy[t, o] h[t, k] per pattern entry), h = x @ A^T.
  triton_random_a_fill:  out[r, c] = A[r, col_start + c] (in place).
  triton_merge_delta_:   weight (out, in) += scale * B @ A (in place; unmerge: -scale).
  triton_batched_sparse_delta: y[t] = base[t] + scales[a] * (x[t] @ A_a^T) @ B_a^T,
                         a = adapter_ids[t] (-1: no adapter), adapters of one pool; an
                         optional plan (the tokens grouped once per step) skips grouping.
  triton_batched_sparse_delta_backward: (grad_x, grad_values over the whole values buffer);
                         adapters sharing a value range sum their gradients.

Autograd: x and values get gradients (and base: grad_y itself); A is frozen.

Checks: shapes, dtypes, devices and scalars by lori_kernels.rules (the rules of the C++ ops and
of every fake kernel, written once), reading nothing. Data the kernels read on the device (B's
mask/offsets, adapter ids and extents) is checked as lori_kernels.validation says: by default
B's contents for CPU tensors, and for the batched ops ids and extents with device-side
reductions and ONE host sync per call; unchecked kernels still never read out of bounds (bad
ids count as -1, extents are clamped).

Kernels run on CUDA tensors, and on CPU tensors only when TRITON_INTERPRET=1 was set before
this module was imported (Triton decides interpreter vs compiler when a kernel is decorated).
Plain torch.library.register_kernel, not torch.library.triton_op: triton_op's fake/compile path
runs the kernel on fake tensors, which fails under the interpreter.
"""
from __future__ import annotations

import contextlib

import torch

from .. import _library  # noqa: F401  (loads lori_kernels._C: the op schemas, and the fakes)
from .. import rules, spec, validation
from ..packing import unpack_mask, validate_packed
from . import batched_delta as _batched
from . import merge_delta as _merge
from . import random_a as _random_a
from . import sparse_delta_bwd as _bwd
from . import sparse_delta_fwd as _fwd

INTERPRET = bool(_fwd.INTERPRET)  # the kernels were decorated for the interpreter


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


def _check_delta(op: str, x, mask, values, offsets, rank, distribution, scale, col_start=0,
                 in_features=-1) -> None:
    """The single-adapter ops' rules, then B's contents where validation asks for them."""
    rules.sparse_delta(op, x, mask, values, offsets, rank, distribution, scale,
                       col_start=col_start, n_in=in_features)
    _check_contents(op, x, mask, values, offsets, rank)


def _n_in(in_features: int, width: int) -> int:
    return width if in_features == -1 else in_features


def _check_contents(op: str, x, mask, values, offsets, rank) -> None:
    if validation.validate_contents(x.device):
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
def _triton_sparse_delta(x, mask, values, offsets, rank, seed, distribution, scale, col_start=0,
                         in_features=-1):
    _check_delta("triton_sparse_delta", x, mask, values, offsets, rank, distribution, scale,
                 col_start, in_features)
    with _on(x):
        return _fwd.sparse_delta_fwd(x, *_b(mask, values, offsets), rank, seed, distribution,
                                     float(scale), INTERPRET, col_start,
                                     _n_in(in_features, x.shape[-1]))


@torch.library.register_kernel("lori::triton_sparse_delta_backward", ("cpu", "cuda"))
def _triton_sparse_delta_backward(grad_y, x, mask, values, offsets, rank, seed, distribution,
                                  scale, need_x, need_values, col_start=0, in_features=-1):
    op = "triton_sparse_delta_backward"
    _check_delta(op, x, mask, values, offsets, rank, distribution, scale, col_start,
                 in_features)
    rules.like_output(op, "grad_y", grad_y, x, mask.shape[0])
    with _on(x):
        return _bwd.sparse_delta_bwd(grad_y, x, *_b(mask, values, offsets), rank, seed,
                                     distribution, float(scale), bool(need_x), bool(need_values),
                                     INTERPRET, col_start, _n_in(in_features, x.shape[-1]))


@torch.library.register_kernel("lori::triton_shrink", ("cpu", "cuda"))
def _triton_shrink(x, rank, seed, distribution, col_start=0, in_features=-1):
    op = "triton_shrink"
    rules.shrink(op, x, rank, distribution, col_start, in_features)
    _check_runnable(op, x)
    K = x.shape[-1]
    T = x.numel() // K
    acc = _fwd.acc_dtype_for(x.dtype)
    if T == 0:
        return torch.zeros((*x.shape[:-1], rank), dtype=acc, device=x.device)
    with _on(x):
        h, split = _fwd.shrink(x.reshape(T, K), rank, seed, distribution, _n_in(in_features, K),
                               acc, INTERPRET, col_start)
    h = h[0] if split == 1 else h.sum(0)  # a fixed-order sum of the splits' partials
    return h.reshape(*x.shape[:-1], rank)


@torch.library.register_kernel("lori::triton_shrink_backward", ("cpu", "cuda"))
def _triton_shrink_backward(grad_h, width, dtype, rank, seed, distribution, col_start=0,
                            in_features=-1):
    op = "triton_shrink_backward"
    rules.shrink_backward(op, grad_h, width, dtype, rank, distribution, col_start, in_features)
    _check_runnable(op, grad_h)
    T = grad_h.numel() // rank
    gx = torch.empty((T, width), dtype=dtype, device=grad_h.device)
    if T:
        cfg = _fwd.config(T, rank, grad_h.device, INTERPRET)
        k_scale = 1.0
        with _on(grad_h):
            _bwd.expand_a(grad_h.reshape(T, rank).contiguous(), 1, T, gx, rank, seed,
                          distribution, _n_in(in_features, width), col_start, k_scale, cfg)
    return gx.reshape(*grad_h.shape[:-1], width)


@torch.library.register_kernel("lori::triton_expand", ("cpu", "cuda"))
def _triton_expand(h, mask, values, offsets, scale):
    op = "triton_expand"
    rules.expand(op, h, mask, values, offsets, scale)
    _check_contents(op, h, mask, values, offsets, h.shape[-1])
    rank = h.shape[-1]
    T = h.numel() // rank
    y = torch.empty((*h.shape[:-1], mask.shape[0]), dtype=values.dtype, device=h.device)
    with _on(h):
        return _fwd.expand_parts(h.reshape(T, rank).contiguous(), 1, T,
                                 *_b(mask, values, offsets), rank, float(scale), values.dtype,
                                 INTERPRET, y)


@torch.library.register_kernel("lori::triton_expand_backward", ("cpu", "cuda"))
def _triton_expand_backward(grad_y, h, mask, values, offsets, scale, need_h, need_values):
    op = "triton_expand_backward"
    rules.expand(op, h, mask, values, offsets, scale)
    rank = h.shape[-1]
    rules.expand_grad_y(op, grad_y, h, values, mask.shape[0])
    _check_contents(op, h, mask, values, offsets, rank)
    T, O = h.numel() // rank, mask.shape[0]
    gh = torch.zeros(h.shape, dtype=h.dtype, device=h.device) if need_h else h.new_empty((0,))
    gv = (torch.zeros_like(values) if need_values else values.new_empty((0,)))
    if T == 0 or O == 0 or not (need_h or need_values):
        return gh, gv
    m, v, off = _b(mask, values, offsets)
    gy2 = grad_y.reshape(T, O).contiguous()
    cfg = _fwd.config(T, rank, h.device, INTERPRET)
    with _on(h):
        if need_h:
            parts, split = _bwd.gy_b(gy2, m, v, off, T, rank, h.dtype, cfg, INTERPRET)
            gh = ((parts[0] if split == 1 else parts.sum(0)) * scale).reshape(h.shape)
        if need_values and values.numel():
            gv = _bwd.grad_values(gy2, h.reshape(T, rank).contiguous(), 1, m, v, off, T, rank,
                                  float(scale), cfg, INTERPRET)
    return gh, gv


@torch.library.register_kernel("lori::triton_random_a_fill", ("cpu", "cuda"))
def _triton_random_a_fill(out, seed, in_features, col_start, distribution):
    op = "triton_random_a_fill"
    rules.random_a_out(op, out, in_features, col_start, distribution)
    _check_runnable(op, out)
    with _on(out):
        _random_a.random_a_fill(out, seed, in_features, col_start, distribution, INTERPRET)


@torch.library.register_kernel("lori::triton_merge_delta_", ("cpu", "cuda"))
def _triton_merge_delta_(weight, mask, values, offsets, rank, seed, distribution, scale,
                         col_start=0, in_features=-1):
    op = "triton_merge_delta_"
    rules.merge(op, weight, mask, values, offsets, rank, distribution, scale, col_start,
                in_features)
    _check_contents(op, weight, mask, values, offsets, rank)
    with _on(weight):
        _merge.merge_delta_(weight, *_b(mask, values, offsets), rank, seed, distribution,
                            float(scale), INTERPRET, col_start,
                            _n_in(in_features, weight.shape[1]))


# ---- batched multi-adapter ops ------------------------------------------------------------------

def _check_batched_contents(op, ids, masks, values, value_starts, offsets, distributions,
                            rank) -> None:
    """Ids in [-1, N) and each used adapter's value extent and distribution, as the C++ op.

    Computed with device-side reductions and read back with ONE host sync (a no-op for CPU
    tensors). Validation "off" (lori_kernels.validation) skips it and the sync, e.g. for CUDA
    graph capture; the kernels still never read out of bounds (bad ids are treated as -1,
    extents clamped). The error path may sync more to build its message. Each used adapter's
    mask/offsets consistency is checked where validate_contents says (CPU tensors; CUDA under
    "full")."""
    T, n, C = ids.numel(), masks.shape[0], offsets.shape[1] - 1
    if T == 0:
        return
    if validation.validate_ids():
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
    if validation.validate_contents(ids.device):
        used = torch.unique(ids[(ids >= 0) & (ids < n)].long())  # as the kernels see them
        _check_used_bitmasks(op, used, masks, offsets, rank)


def _plan_or_none(order, starts, adapters):
    return None if order is None else (order.contiguous(), starts.contiguous(),
                                       adapters.contiguous())


def verify_plan(op, ids, order, starts, adapters, n) -> None:
    """Validation "full": the plan must be the ids' grouping (reference.batched_plan's form),
    else ValueError naming the first disagreement, with the C++ op's messages. Reads the ids
    and the plan back to the host."""
    idl = ids.reshape(-1).long().cpu().tolist()
    o, st, ad = order.cpu().tolist(), starts.cpu().tolist(), adapters.cpu().tolist()
    T, G = len(idl), len(ad)
    for t, i in enumerate(idl):
        if i < -1 or i >= n:
            raise ValueError(f"{op}: adapter_ids[{t}] = {i} is out of range for a pool of {n} "
                             f"adapters (valid: -1 for none, 0..{n - 1})")
    if st[0] != 0 or st[G] != T:
        raise ValueError(f"{op}: plan_starts must run from 0 to the token count {T}, got "
                         f"{st[0]} .. {st[G]}")
    for g in range(G):
        if st[g] >= st[g + 1]:
            raise ValueError(f"{op}: plan_starts must be strictly increasing (no empty group), "
                             f"got plan_starts[{g}] = {st[g]} and plan_starts[{g + 1}] = "
                             f"{st[g + 1]}")
        if not -1 <= ad[g] < n:
            raise ValueError(f"{op}: plan_adapters[{g}] = {ad[g]} is out of range for a pool of "
                             f"{n} adapters (valid: -1 for none, 0..{n - 1})")
        if g and ad[g - 1] >= ad[g]:
            raise ValueError(f"{op}: plan_adapters must be strictly increasing (one group per "
                             f"adapter), got plan_adapters[{g - 1}] = {ad[g - 1]} and "
                             f"plan_adapters[{g}] = {ad[g]}")
    seen = [False] * T
    for g in range(G):
        for p in range(st[g], st[g + 1]):
            t = o[p]
            if not (0 <= t < T) or seen[t]:
                raise ValueError(f"{op}: plan_order is not a permutation of the {T} tokens "
                                 f"(plan_order[{p}] = {t})")
            seen[t] = True
            if idl[t] != ad[g]:
                raise ValueError(f"{op}: the plan does not match adapter_ids: token {t} "
                                 f"(plan_order[{p}]) is in the group of adapter {ad[g]} but "
                                 f"adapter_ids[{t}] = {idl[t]}")
            if p != st[g] and o[p - 1] >= t:
                raise ValueError(f"{op}: plan_order is not a stable sort of adapter_ids "
                                 f"(plan_order[{p - 1}] = {o[p - 1]} before plan_order[{p}] = "
                                 f"{t} in one group)")


def _check_batched_plan(op, ids, plan, masks, values, value_starts, offsets, distributions,
                        rank) -> None:
    """With a plan the ids are neither grouped nor checked ("on" trusts the plan: AdapterPool
    builds it from the ids it validated; no sync); "full" verifies it against the ids and then
    checks as without a plan. B's contents (CPU tensors under "on") are checked for the plan's
    adapters."""
    if validation.get_validation() == "full":
        verify_plan(op, ids, *plan, masks.shape[0])
        _check_batched_contents(op, ids, masks, values, value_starts, offsets, distributions,
                                rank)
    elif validation.validate_contents(ids.device):
        ad = plan[2]
        used = ad[(ad >= 0) & (ad < masks.shape[0])].long()
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


def _checked_plan(op, x, adapter_ids, plan_order, plan_starts, plan_adapters, masks, values,
                  value_starts, offsets, distributions, rank):
    """The batched forward's and backward's shared checks after the data-free rules: the plan's
    rules, that Triton can run here, then the pool's contents against the ids, or against the
    plan when one is given. Returns the plan (or None)."""
    rules.batched_plan(op, x, plan_order, plan_starts, plan_adapters)
    _check_runnable(op, x)
    plan = _plan_or_none(plan_order, plan_starts, plan_adapters)
    if plan is None:
        _check_batched_contents(op, adapter_ids, masks, values, value_starts, offsets,
                                distributions, rank)
    else:
        _check_batched_plan(op, adapter_ids, plan, masks, values, value_starts, offsets,
                            distributions, rank)
    return plan


@torch.library.register_kernel("lori::triton_batched_sparse_delta", ("cpu", "cuda"))
def _triton_batched_sparse_delta(x, adapter_ids, masks, values, value_starts, offsets, seeds,
                                 scales, distributions, rank, base=None, plan_order=None,
                                 plan_starts=None, plan_adapters=None):
    op = "triton_batched_sparse_delta"
    rules.batched(op, x, adapter_ids, masks, values, value_starts, offsets, seeds, scales,
                  distributions, rank)
    if base is not None:
        rules.like_output(op, "base", base, x, masks.shape[1])
    plan = _checked_plan(op, x, adapter_ids, plan_order, plan_starts, plan_adapters, masks,
                         values, value_starts, offsets, distributions, rank)
    pool = _pool(masks, values, value_starts, offsets, seeds, scales, distributions)
    with _on(x):
        return _batched.batched_fwd(x, adapter_ids, *pool, rank, base, INTERPRET, plan)


@torch.library.register_kernel("lori::triton_batched_sparse_delta_backward", ("cpu", "cuda"))
def _triton_batched_sparse_delta_backward(grad_y, x, adapter_ids, masks, values, value_starts,
                                          offsets, seeds, scales, distributions, rank, need_x,
                                          need_values, plan_order=None, plan_starts=None,
                                          plan_adapters=None):
    op = "triton_batched_sparse_delta_backward"
    rules.batched(op, x, adapter_ids, masks, values, value_starts, offsets, seeds, scales,
                  distributions, rank)
    rules.like_output(op, "grad_y", grad_y, x, masks.shape[1])
    plan = _checked_plan(op, x, adapter_ids, plan_order, plan_starts, plan_adapters, masks,
                         values, value_starts, offsets, distributions, rank)
    pool = _pool(masks, values, value_starts, offsets, seeds, scales, distributions)
    with _on(x):
        return _batched.batched_bwd(grad_y, x, adapter_ids, *pool, rank, bool(need_x),
                                    bool(need_values), INTERPRET, plan)


# ---- autograd: gradients for x and values; A is frozen ------------------------------------------

def _setup_context(ctx, inputs, output):
    x, mask, values, offsets, rank, seed, distribution, scale = inputs[:8]
    ctx.save_for_backward(x, mask, values, offsets)
    ctx.args = (rank, seed, distribution, scale)
    ctx.window = tuple(inputs[8:10]) + (0, -1)[len(inputs[8:10]):]


def _backward(ctx, grad_y):
    x, mask, values, offsets = ctx.saved_tensors
    need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_x or need_values):
        return (None,) * 10
    gx, gv = torch.ops.lori.triton_sparse_delta_backward(
        grad_y.contiguous(), x, mask, values, offsets, *ctx.args, need_x, need_values,
        *ctx.window)
    return (gx if need_x else None, None, gv if need_values else None, None, None, None, None,
            None, None, None)


torch.library.register_autograd("lori::triton_sparse_delta", _backward,
                                setup_context=_setup_context)


def _shrink_setup_context(ctx, inputs, output):
    x, rank, seed, distribution = inputs[:4]
    window = tuple(inputs[4:6]) + (0, -1)[len(inputs[4:6]):]
    ctx.args = (x.shape[-1], x.dtype, rank, seed, distribution, *window)


def _shrink_backward(ctx, grad_h):
    gx = torch.ops.lori.triton_shrink_backward(grad_h.contiguous(), *ctx.args)
    return (gx, None, None, None, None, None)


torch.library.register_autograd("lori::triton_shrink", _shrink_backward,
                                setup_context=_shrink_setup_context)


def _expand_setup_context(ctx, inputs, output):
    h, mask, values, offsets, scale = inputs
    ctx.save_for_backward(h, mask, values, offsets)
    ctx.scale = scale


def _expand_backward(ctx, grad_y):
    need_h, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_h or need_values):
        return (None,) * 5
    gh, gv = torch.ops.lori.triton_expand_backward(grad_y.contiguous(), *ctx.saved_tensors,
                                                   ctx.scale, need_h, need_values)
    return (gh if need_h else None, None, gv if need_values else None, None, None)


torch.library.register_autograd("lori::triton_expand", _expand_backward,
                                setup_context=_expand_setup_context)


# ---- batched autograd (x, values and base get gradients) ----------------------------------

def _batched_setup_context(ctx, inputs, output):
    (x, ids, masks, values, value_starts, offsets, seeds, scales, dists, rank, base, *plan) = inputs
    ctx.save_for_backward(x, ids, masks, values, value_starts, offsets, seeds, scales, dists)
    ctx.rank = rank
    ctx.has_base = base is not None
    ctx.plan = tuple(plan) + (None,) * (3 - len(plan))  # the backward reuses the step's plan


def _batched_backward(ctx, grad_y):
    # Input order: x 0, adapter_ids 1, masks 2, values 3, ..., rank 9, base 10, plan 11-13.
    need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    need_base = ctx.has_base and ctx.needs_input_grad[10]
    gx = gv = None
    if need_x or need_values:
        gx, gv = torch.ops.lori.triton_batched_sparse_delta_backward(
            grad_y.contiguous(), *ctx.saved_tensors, ctx.rank, need_x, need_values, *ctx.plan)
    return (gx if need_x else None, None, None, gv if need_values else None, None, None, None,
            None, None, None, grad_y if need_base else None, None, None, None)


torch.library.register_autograd("lori::triton_batched_sparse_delta", _batched_backward,
                                setup_context=_batched_setup_context)

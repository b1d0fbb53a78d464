"""Triton batched multi-adapter LoRI delta (forward and backward), punica SGMV / vLLM style.

Semantics (lori::batched_sparse_delta):
    y[t] = base[t] + scales[a] * (x[t] @ A_a^T) @ B_a^T,   a = adapter_ids[t]   (a == -1: base[t])

Tokens are grouped by adapter on the device (grouping.py: `perm`, the `segs` and `work`
tables, no host sync), or the tables are cut from the step's plan when one is given; every grid's first axis runs over one of these tables and programs on
unused rows return at once.

Passes (each A or B tile is produced once per program and reused by all its tokens):
  forward  shrink  (work, rank tile, K split): h[p] = x[perm[p]] @ A_a^T, A tile per K tile
           expand  (work, out tile): y[perm[p]] = base + scale_a * h[p] @ B_a^T (idle tiles
                   write base or 0, so y needs no zero fill and base no clone)
  backward gy_b    (work, rank tile, out split): gh[p] = grad_y[perm[p]] @ B_a
           gh_a    (work, K tile): grad_x[perm[p]] = scale_a * gh[p] @ A_a (0 for idle tokens)
           shrink  as in the forward: h (recomputed, not saved)
           gv      (segment, out tile, rank tile): the segment's whole token loop of
                   grad_y^T h, added into grad_values[value_starts[a] + pattern index]
h and gh are fp32 (fp64 for fp64 inputs), indexed by sorted position; K / out splits write
partials summed in a fixed order. grad_values uses tl.atomic_add into a zeroed buffer: each
entry has one writer unless two used adapters share a value range (then their gradients sum,
as in the C++ op, in an unspecified order), so results are reproducible for pools whose
adapters own their extents (AdapterPool always does).

Decode vs prefill: BLOCK_T follows T (16 for T <= 16, else up to 64). Many adapters with one
token each give one work row per adapter: A is generated once per (adapter, K tile) and the
shrink's K axis is split across programs to fill the GPU; B is read once per adapter and out
tile. A long run of one adapter gives cdiv(len, 64) work rows, so A is generated once per
64 tokens, as in sparse_delta. Designed for, not measured: no GPU has run these kernels.

Bounds: ids outside [-1, N) are mapped to -1 before grouping (the op checks them first, see
the op registration); each adapter's value extent is clamped to the values buffer and every B read is
bounded by it, so a corrupt pool never makes a kernel read or write out of bounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import spec
from .common import (acc_dtype_for, b_row_starts, b_tile, b_tile_slots, cast_rne, config, jit,
                     key_from_seed, load_rows, load_split_sum, mm, plan_split, split_tiles,
                     store_split_part)
from .grouping import (IDLE, NO_WORK, Groups, group_tokens, groups_from_plan,  # noqa: F401
                       load_item)
from .random_a import a_tile_any


# ---- per-program helpers -----------------------------------------------------------------------

@triton.jit
def adapter_b(a, masks_ptr, offsets_ptr, vstarts_ptr, n_out, n_values, WORDS: tl.constexpr):
    """Adapter a's mask and offsets rows, and its value extent [vstart, vstart + nnz) clamped to
    the values buffer (so B reads stay inside it whatever the pool holds)."""
    a64 = a.to(tl.int64)
    mask_a = masks_ptr + a64 * n_out * WORDS
    off_a = offsets_ptr + a64 * ((n_out + 63) // 64 + 1)
    vstart = tl.minimum(tl.maximum(tl.load(vstarts_ptr + a64), 0), n_values)
    nnz = tl.minimum(tl.load(off_a + (n_out + 63) // 64).to(tl.int64), n_values - vstart)
    return mask_a, off_a, vstart, nnz


# ---- forward kernels ----------------------------------------------------------------------------

@jit
def shrink_kernel(x_ptr, perm_ptr, work_ptr, seeds_ptr, dists_ptr, h_ptr, T, K, rank,
                  stride_xt, stride_xk, mag_r, mag_u, n_ktiles, tiles_per_split,
                  BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[s, p, r] = sum_j x[perm[p], j] A_a[r, j] over split s's column tiles, for the sorted
    positions p of one work tile (h is (split, T, rank))."""
    a, offs_p, t_ok = load_item(work_ptr, tl.program_id(0), BLOCK_T)
    if a < 0:
        return
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    DOT: tl.constexpr = x_ptr.dtype.element_ty
    ACC: tl.constexpr = h_ptr.dtype.element_ty
    key0, key1 = key_from_seed(tl.load(seeds_ptr + a))
    dist = tl.load(dists_ptr + a)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    tok = tl.load(perm_ptr + offs_p, mask=t_ok, other=0)
    x_rows = x_ptr + tok.to(tl.int64)[:, None] * stride_xt
    acc = tl.zeros((BLOCK_T, BLOCK_R), ACC)
    kt0, kt1 = split_tiles(pid_s, tiles_per_split, n_ktiles)
    for kt in range(kt0, kt1):
        col0 = kt * BLOCK_K
        offs_k = col0 + tl.arange(0, BLOCK_K)
        xt = load_rows(x_rows, offs_k, stride_xk, K, t_ok)
        at = a_tile_any(key0, key1, rows, col0, dist, mag_r, mag_u, BLOCK_R, BLOCK_K)
        acc += mm(xt, tl.trans(cast_rne(at, DOT)), ACC)
    store_split_part(h_ptr, pid_s, T, offs_p, rows, rank, acc, t_ok)


@jit
def expand_kernel(h_ptr, perm_ptr, work_ptr, masks_ptr, values_ptr, vstarts_ptr, offsets_ptr,
                  scales_ptr, base_ptr, y_ptr, T, n_out, rank, n_values, n_split, stride_bt,
                  stride_bo, HAS_BASE: tl.constexpr, WORDS: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """y[perm[p], o] = base[perm[p], o] + scale_a * sum_k h[p, k] B_a[o, k] for one work tile and
    out tile, rounded once; idle tiles (a == -1) write base (or 0)."""
    a, offs_p, t_ok = load_item(work_ptr, tl.program_id(0), BLOCK_T)
    if a == -2:
        return
    DOT: tl.constexpr = values_ptr.dtype.element_ty
    ACC: tl.constexpr = h_ptr.dtype.element_ty
    o0 = tl.program_id(1) * BLOCK_O
    offs_o = o0 + tl.arange(0, BLOCK_O)
    tok = tl.load(perm_ptr + offs_p, mask=t_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_O), ACC)
    if a >= 0:
        mask_a, off_a, vstart, nnz = adapter_b(a, masks_ptr, offsets_ptr, vstarts_ptr, n_out,
                                               n_values, WORDS)
        row_start = b_row_starts(mask_a, off_a, o0, offs_o, n_out, WORDS, BLOCK_O)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            bv = b_tile(mask_a, values_ptr + vstart, off_a, row_start, o0, offs_o, offs_r, n_out,
                        rank, nnz, WORDS, BLOCK_O, BLOCK_R)
            ht = load_split_sum(h_ptr, n_split, T * rank, offs_p, offs_r, rank,
                                t_ok[:, None] & (offs_r < rank)[None, :])
            acc += mm(cast_rne(ht, DOT), tl.trans(bv), ACC)
        acc = acc * tl.load(scales_ptr + a).to(ACC)
    ok = t_ok[:, None] & (offs_o < n_out)[None, :]
    if HAS_BASE:
        acc += tl.load(base_ptr + tok[:, None] * stride_bt + offs_o.to(tl.int64)[None, :] * stride_bo,
                       mask=ok, other=0).to(ACC)
    tl.store(y_ptr + tok[:, None] * n_out + offs_o[None, :], cast_rne(acc, y_ptr.dtype.element_ty),
             mask=ok)


# ---- backward kernels ---------------------------------------------------------------------------

@jit
def gy_b_kernel(gy_ptr, perm_ptr, work_ptr, masks_ptr, values_ptr, vstarts_ptr, offsets_ptr,
                gh_ptr, T, n_out, rank, n_values, stride_gt, stride_go, n_otiles,
                tiles_per_split, WORDS: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """gh[s, p, k] = sum_o grad_y[perm[p], o] B_a[o, k] over split s's out tiles."""
    a, offs_p, t_ok = load_item(work_ptr, tl.program_id(0), BLOCK_T)
    if a < 0:
        return
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    ACC: tl.constexpr = gh_ptr.dtype.element_ty
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    tok = tl.load(perm_ptr + offs_p, mask=t_ok, other=0).to(tl.int64)
    mask_a, off_a, vstart, nnz = adapter_b(a, masks_ptr, offsets_ptr, vstarts_ptr, n_out,
                                           n_values, WORDS)
    gy_rows = gy_ptr + tok[:, None] * stride_gt
    acc = tl.zeros((BLOCK_T, BLOCK_R), ACC)
    ot0, ot1 = split_tiles(pid_s, tiles_per_split, n_otiles)
    for ot in range(ot0, ot1):
        o0 = ot * BLOCK_O
        offs_o = o0 + tl.arange(0, BLOCK_O)
        row_start = b_row_starts(mask_a, off_a, o0, offs_o, n_out, WORDS, BLOCK_O)
        bv = b_tile(mask_a, values_ptr + vstart, off_a, row_start, o0, offs_o, offs_r, n_out, rank,
                    nnz, WORDS, BLOCK_O, BLOCK_R)
        g = load_rows(gy_rows, offs_o, stride_go, n_out, t_ok)
        acc += mm(g, bv, ACC)
    store_split_part(gh_ptr, pid_s, T, offs_p, offs_r, rank, acc, t_ok)


@jit
def gh_a_kernel(gh_ptr, perm_ptr, work_ptr, seeds_ptr, dists_ptr, scales_ptr, gx_ptr, T, K,
                rank, mag_r, mag_u, n_split, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """grad_x[perm[p], j] = scale_a * sum_k gh[p, k] A_a[k, j] for one work tile and column
    tile; idle tiles write 0."""
    a, offs_p, t_ok = load_item(work_ptr, tl.program_id(0), BLOCK_T)
    if a == -2:
        return
    DOT: tl.constexpr = gx_ptr.dtype.element_ty
    ACC: tl.constexpr = gh_ptr.dtype.element_ty
    col0 = tl.program_id(1) * BLOCK_K
    offs_k = col0 + tl.arange(0, BLOCK_K)
    tok = tl.load(perm_ptr + offs_p, mask=t_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_K), ACC)
    if a >= 0:
        key0, key1 = key_from_seed(tl.load(seeds_ptr + a))
        dist = tl.load(dists_ptr + a)
        for r0 in range(0, rank, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            g = load_split_sum(gh_ptr, n_split, T * rank, offs_p, rows, rank,
                               t_ok[:, None] & (rows < rank)[None, :])
            at = a_tile_any(key0, key1, rows, col0, dist, mag_r, mag_u, BLOCK_R, BLOCK_K)
            acc += mm(cast_rne(g, DOT), cast_rne(at, DOT), ACC)
        acc = acc * tl.load(scales_ptr + a).to(ACC)
    tl.store(gx_ptr + tok[:, None] * K + offs_k[None, :], cast_rne(acc, gx_ptr.dtype.element_ty),
             mask=t_ok[:, None] & (offs_k < K)[None, :])


@jit
def gv_kernel(gy_ptr, h_ptr, perm_ptr, segs_ptr, masks_ptr, vstarts_ptr, offsets_ptr,
              scales_ptr, gv_ptr, T, n_out, rank, n_values, stride_gt, stride_go, h_split,
              WORDS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
              BLOCK_R: tl.constexpr):
    """gv[vstart_a + p(o, k)] += scale_a * sum_{t in segment} grad_y[t, o] h[t, k] for the pattern
    entries of one (out tile, rank tile) of the segment's adapter."""
    i = tl.program_id(0)
    a = tl.load(segs_ptr + i * 3)
    if a < 0:
        return
    start = tl.load(segs_ptr + i * 3 + 1)
    end = start + tl.load(segs_ptr + i * 3 + 2)
    ACC: tl.constexpr = gv_ptr.dtype.element_ty
    DOT: tl.constexpr = gy_ptr.dtype.element_ty
    o0 = tl.program_id(1) * BLOCK_O
    offs_o = o0 + tl.arange(0, BLOCK_O)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    o_ok = offs_o < n_out
    r_ok = offs_r < rank
    acc = tl.zeros((BLOCK_O, BLOCK_R), ACC)
    for p0 in range(start, end, BLOCK_T):
        offs_p = p0 + tl.arange(0, BLOCK_T)
        t_ok = offs_p < end
        tok = tl.load(perm_ptr + offs_p, mask=t_ok, other=0).to(tl.int64)
        g = tl.load(gy_ptr + tok[None, :] * stride_gt + offs_o.to(tl.int64)[:, None] * stride_go,
                    mask=o_ok[:, None] & t_ok[None, :], other=0)     # grad_y^T (BLOCK_O, BLOCK_T)
        h = load_split_sum(h_ptr, h_split, T * rank, offs_p, offs_r, rank,
                           t_ok[:, None] & r_ok[None, :])
        acc += mm(g, cast_rne(h, DOT), ACC)
    mask_a, off_a, vstart, nnz = adapter_b(a, masks_ptr, offsets_ptr, vstarts_ptr, n_out,
                                           n_values, WORDS)
    row_start = b_row_starts(mask_a, off_a, o0, offs_o, n_out, WORDS, BLOCK_O)
    idx, ok = b_tile_slots(mask_a, off_a, row_start, o0, offs_o, offs_r, n_out, rank, nnz, WORDS,
                           BLOCK_O, BLOCK_R)
    scale = tl.load(scales_ptr + a).to(ACC)
    tl.atomic_add(gv_ptr + vstart + idx, acc * scale, mask=ok)


# ---- launches -----------------------------------------------------------------------------------

def _mags(in_features: int) -> tuple[float, float]:
    return (spec.magnitude("rademacher", in_features), spec.magnitude("uniform", in_features))


def _shrink(x2, groups, seeds, dists, rank, acc, cfg, interpret):
    """(h_parts (split, T, rank), split)."""
    T, K = x2.shape
    W = groups.work.shape[0]
    n_r, n_k = triton.cdiv(rank, cfg.block_r), triton.cdiv(K, cfg.block_k)
    split, per = plan_split(cfg, W * n_r, n_k, x2.device, interpret)
    h = torch.empty((split, T, rank), dtype=acc, device=x2.device)
    shrink_kernel[(W, n_r, split)](
        x2, groups.perm, groups.work, seeds, dists, h, T, K, rank, x2.stride(0), x2.stride(1),
        *_mags(K), n_k, per, BLOCK_T=cfg.block_t, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k)
    return h, split


def _groups(ids, plan, n_adapters, block_t) -> Groups:
    if plan is not None:
        return groups_from_plan(*plan, n_adapters, block_t)
    return group_tokens(ids, n_adapters, block_t)


def batched_fwd(x, ids, masks, values, value_starts, offsets, seeds, scales, distributions,
                rank, base, interpret, plan=None):
    """y (..., out) in x's dtype; arguments already validated, pool tensors contiguous.
    plan: None or (plan_order, plan_starts, plan_adapters)."""
    K, O = x.shape[-1], masks.shape[1]
    T = x.numel() // K
    # With a plan (trusted for its grouping) y starts at 0: a token no group covers reads 0,
    # never stale memory (AdapterPool's plans cover every token).
    new = torch.empty if plan is None else torch.zeros
    y = new((*x.shape[:-1], O), dtype=x.dtype, device=x.device)
    if T == 0 or O == 0:
        return y
    acc = acc_dtype_for(x.dtype)
    cfg = config(T, rank, x.device, interpret)
    groups = _groups(ids, plan, masks.shape[0], cfg.block_t)
    x2 = x.reshape(T, K)
    h, n_split = _shrink(x2, groups, seeds, distributions, rank, acc, cfg, interpret)
    b2 = base.reshape(T, O) if base is not None else y
    expand_kernel[(groups.work.shape[0], triton.cdiv(O, cfg.block_o))](
        h, groups.perm, groups.work, masks, values, value_starts, offsets, scales, b2, y, T, O,
        rank, values.numel(), n_split, b2.stride(0), b2.stride(1), HAS_BASE=base is not None,
        WORDS=spec.mask_words(rank), BLOCK_T=cfg.block_t, BLOCK_O=cfg.block_o,
        BLOCK_R=cfg.block_r)
    return y


def batched_bwd(grad_y, x, ids, masks, values, value_starts, offsets, seeds, scales,
                distributions, rank, need_x, need_values, interpret, plan=None):
    """(grad_x, grad_values), an empty tensor for a gradient not asked for; grad_values covers
    the whole values buffer (0 outside the used adapters' extents)."""
    K, O = x.shape[-1], masks.shape[1]
    T = x.numel() // K
    gx = x.new_empty((0,))
    gv = values.new_empty((0,))
    if not (need_x or need_values):
        return gx, gv
    if T == 0 or O == 0:
        return (torch.zeros_like(x) if need_x else gx,
                torch.zeros_like(values) if need_values else gv)
    acc = acc_dtype_for(x.dtype)
    cfg = config(T, rank, x.device, interpret)
    groups = _groups(ids, plan, masks.shape[0], cfg.block_t)
    W, S = groups.work.shape[0], groups.segs.shape[0]
    gy2 = grad_y.reshape(T, O)
    n_r, n_o = triton.cdiv(rank, cfg.block_r), triton.cdiv(O, cfg.block_o)
    words = spec.mask_words(rank)
    if need_x:
        split, per = plan_split(cfg, W * n_r, n_o, x.device, interpret)
        gh = torch.empty((split, T, rank), dtype=acc, device=x.device)
        gy_b_kernel[(W, n_r, split)](
            gy2, groups.perm, groups.work, masks, values, value_starts, offsets, gh, T, O, rank,
            values.numel(), gy2.stride(0), gy2.stride(1), n_o, per, WORDS=words,
            BLOCK_T=cfg.block_t, BLOCK_O=cfg.block_o, BLOCK_R=cfg.block_r)
        gx = (torch.empty if plan is None else torch.zeros)(
            (*x.shape[:-1], K), dtype=x.dtype, device=x.device)
        gh_a_kernel[(W, triton.cdiv(K, cfg.block_k))](
            gh, groups.perm, groups.work, seeds, distributions, scales, gx, T, K, rank, *_mags(K),
            split, BLOCK_T=cfg.block_t, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k)
    if need_values:
        h, h_split = _shrink(x.reshape(T, K), groups, seeds, distributions, rank, acc, cfg,
                             interpret)
        gv_acc = torch.zeros(values.numel(), dtype=acc, device=x.device)
        gv_kernel[(S, n_o, n_r)](
            gy2, h, groups.perm, groups.segs, masks, value_starts, offsets, scales, gv_acc, T, O,
            rank, values.numel(), gy2.stride(0), gy2.stride(1), h_split, WORDS=words,
            BLOCK_T=cfg.block_t, BLOCK_O=cfg.block_o, BLOCK_R=cfg.block_r)
        gv = gv_acc if gv_acc.dtype == values.dtype else gv_acc.to(values.dtype)
    return gx, gv

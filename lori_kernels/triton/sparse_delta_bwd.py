"""Triton backward of sparse_delta (A frozen; gradients for x and B's packed values).

  gh      (T, rank) = gy @ B                       gy_b_kernel: B decoded per tile, split over out
  grad_x  (T, in)   = scale * gh @ A               gh_a_kernel: A generated per (rank, column) tile
  h       (T, rank) = x @ A^T                      sparse_delta_fwd.shrink (recomputed, not saved)
  grad_values[p]    = scale * sum_t gy[t, o] h[t, k]   for each pattern entry p = (o, k):
                                                   gv_kernel: (out x rank) tiles of gy^T @ h,
                                                   stored straight into the packed positions
gh and h are fp32 (fp64 for fp64 inputs). In gh_a_kernel each program generates its A tile once
per rank tile and applies it to BLOCK_T tokens, as in the forward's shrink. The reductions over
out (gh) and over T (grad_values) are split across programs when the grid would otherwise be
small (decode: few tokens; prefill: few out blocks); each split writes its own partial result
and the partials are summed in a fixed order (no atomics: bitwise reproducible).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import spec
from .common import (acc_dtype_for, b_row_starts, b_tile, b_tile_slots, cast_rne, config, jit,
                     key_args, key_u32, load_rows, load_split_sum, mm, plan_split, split_tiles,
                     store_split_part)
from .random_a import a_tile_at, window_aligned
from .sparse_delta_fwd import shrink


@jit
def gy_b_kernel(gy_ptr, mask_ptr, values_ptr, offsets_ptr, gh_ptr, T, n_out, rank, nnz,
                stride_gt, stride_go, n_otiles, tiles_per_split, WORDS: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """gh[s, t, k] = sum_o gy[t, o] B[o, k] over split s's out tiles (gh is (split, T, rank))."""
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    DOT: tl.constexpr = values_ptr.dtype.element_ty
    ACC: tl.constexpr = gh_ptr.dtype.element_ty
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    t_ok = offs_t < T
    gy_rows = gy_ptr + offs_t.to(tl.int64)[:, None] * stride_gt
    acc = tl.zeros((BLOCK_T, BLOCK_R), ACC)
    ot0, ot1 = split_tiles(pid_s, tiles_per_split, n_otiles)
    for ot in range(ot0, ot1):
        o0 = ot * BLOCK_O
        offs_o = o0 + tl.arange(0, BLOCK_O)
        row_start = b_row_starts(mask_ptr, offsets_ptr, o0, offs_o, n_out, WORDS, BLOCK_O)
        bv = b_tile(mask_ptr, values_ptr, offsets_ptr, row_start, o0, offs_o, offs_r, n_out, rank,
                    nnz, WORDS, BLOCK_O, BLOCK_R)
        g = load_rows(gy_rows, offs_o, stride_go, n_out, t_ok)
        acc += mm(g, bv, ACC)
    store_split_part(gh_ptr, pid_s, T, offs_t, offs_r, rank, acc, t_ok)


@jit
def gh_a_kernel(gh_ptr, gx_ptr, T, K, rank, k0, k1, mag, scale, col_start, n_split,
                DIST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr):
    """grad_x[t, j] = scale * sum_k gh[t, k] A[k, col_start + j] for one (token block, column
    tile); gh = sum of gy_b_kernel's n_split partials."""
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    key0 = key_u32(k0)
    key1 = key_u32(k1)
    DOT: tl.constexpr = gx_ptr.dtype.element_ty
    ACC: tl.constexpr = gh_ptr.dtype.element_ty
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    col0 = pid_k * BLOCK_K
    offs_k = col0 + tl.arange(0, BLOCK_K)
    t_ok = offs_t < T
    acc = tl.zeros((BLOCK_T, BLOCK_K), ACC)
    for r0 in range(0, rank, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        g = load_split_sum(gh_ptr, n_split, T * rank, offs_t, rows, rank,
                           t_ok[:, None] & (rows < rank)[None, :])
        a = cast_rne(a_tile_at(key0, key1, rows, col_start + col0, mag, DIST, BLOCK_R, BLOCK_K,
                               ALIGNED), DOT)
        acc += mm(cast_rne(g, DOT), a, ACC)
    out = acc * scale
    ptrs = gx_ptr + offs_t.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, cast_rne(out, gx_ptr.dtype.element_ty),
             mask=t_ok[:, None] & (offs_k < K)[None, :])


@jit
def gv_kernel(gy_ptr, h_ptr, mask_ptr, offsets_ptr, gv_ptr, T, n_out, rank, nnz, scale,
              stride_gt, stride_go, n_ttiles, tiles_per_split, h_split, WORDS: tl.constexpr,
              BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """gv[s, p] = scale * sum_t gy[t, o] h[t, k] for the entries p = (o, k) of one
    (BLOCK_O x BLOCK_R) tile of B, over split s's token tiles (gv is (split, nnz));
    h = sum of the shrink's h_split partials."""
    pid_o = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    DOT: tl.constexpr = gy_ptr.dtype.element_ty
    ACC: tl.constexpr = gv_ptr.dtype.element_ty
    o0 = pid_o * BLOCK_O
    offs_o = o0 + tl.arange(0, BLOCK_O)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_ok = offs_o < n_out
    r_ok = offs_r < rank
    acc = tl.zeros((BLOCK_O, BLOCK_R), ACC)
    tt0, tt1 = split_tiles(pid_s, tiles_per_split, n_ttiles)
    for tt in range(tt0, tt1):
        offs_t = tt * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        g = tl.load(gy_ptr + offs_t.to(tl.int64)[None, :] * stride_gt
                    + offs_o.to(tl.int64)[:, None] * stride_go,
                    mask=o_ok[:, None] & t_ok[None, :], other=0)     # gy^T tile (BLOCK_O, BLOCK_T)
        h = load_split_sum(h_ptr, h_split, T * rank, offs_t, offs_r, rank,
                           t_ok[:, None] & r_ok[None, :])
        acc += mm(g, cast_rne(h, DOT), ACC)
    row_start = b_row_starts(mask_ptr, offsets_ptr, o0, offs_o, n_out, WORDS, BLOCK_O)
    idx, ok = b_tile_slots(mask_ptr, offsets_ptr, row_start, o0, offs_o, offs_r, n_out, rank, nnz,
                           WORDS, BLOCK_O, BLOCK_R)
    tl.store(gv_ptr + pid_s.to(tl.int64) * nnz + idx, acc * scale, mask=ok)


def expand_a(gh: torch.Tensor, n_split: int, T: int, gx2: torch.Tensor, rank: int, seed: int,
             distribution: str, in_features: int, col_start: int, scale: float, cfg) -> None:
    """gx2 (T, width), contiguous, = scale * (sum of gh's n_split partials) @ A_window."""
    K = gx2.shape[1]
    k0, k1 = key_args(seed)
    gh_a_kernel[(triton.cdiv(T, cfg.block_t), triton.cdiv(K, cfg.block_k))](
        gh, gx2, T, K, rank, k0, k1, spec.magnitude(distribution, in_features), scale, col_start,
        n_split, DIST=spec.DISTRIBUTIONS[distribution], BLOCK_T=cfg.block_t, BLOCK_R=cfg.block_r,
        BLOCK_K=cfg.block_k, ALIGNED=window_aligned(col_start, distribution))


def gy_b(gy2: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
         T: int, rank: int, acc: torch.dtype, cfg, interpret: bool) -> tuple[torch.Tensor, int]:
    """(gh_parts, split): gh = gy2 @ B (unscaled) = gh_parts.sum(0), (split, T, rank)."""
    O = mask.shape[0]
    n_t, n_r = triton.cdiv(T, cfg.block_t), triton.cdiv(rank, cfg.block_r)
    n_o = triton.cdiv(O, cfg.block_o)
    split, per = plan_split(cfg, n_t * n_r, n_o, gy2.device, interpret)
    gh = torch.empty((split, T, rank), dtype=acc, device=gy2.device)
    gy_b_kernel[(n_t, n_r, split)](
        gy2, mask, values, offsets, gh, T, O, rank, values.numel(), gy2.stride(0),
        gy2.stride(1), n_o, per, WORDS=spec.mask_words(rank), BLOCK_T=cfg.block_t,
        BLOCK_O=cfg.block_o, BLOCK_R=cfg.block_r)
    return gh, split


def grad_values(gy2: torch.Tensor, h: torch.Tensor, h_split: int, mask: torch.Tensor,
                values: torch.Tensor, offsets: torch.Tensor, T: int, rank: int, scale: float,
                cfg, interpret: bool) -> torch.Tensor:
    """grad_values = scale * sum_t gy[t, o] h[t, k] per pattern entry, in values' dtype; h the
    sum of h_split partials (split, T, rank) in the accumulation dtype."""
    O = mask.shape[0]
    acc = h.dtype
    k_scale = 1.0 if acc == torch.float64 else scale
    n_t, n_r = triton.cdiv(T, cfg.block_t), triton.cdiv(rank, cfg.block_r)
    n_o = triton.cdiv(O, cfg.block_o)
    split, per = plan_split(cfg, n_o * n_r, n_t, gy2.device, interpret)
    gv_parts = torch.zeros((split, values.numel()), dtype=acc, device=gy2.device)
    gv_kernel[(n_o, n_r, split)](
        gy2, h, mask, offsets, gv_parts, T, O, rank, values.numel(), k_scale, gy2.stride(0),
        gy2.stride(1), n_t, per, h_split, WORDS=spec.mask_words(rank), BLOCK_T=cfg.block_t,
        BLOCK_O=cfg.block_o, BLOCK_R=cfg.block_r)
    gv_acc = gv_parts[0] if split == 1 else gv_parts.sum(0)
    if acc == torch.float64 and scale != 1.0:
        gv_acc = gv_acc * scale
    return gv_acc if gv_acc.dtype == values.dtype else gv_acc.to(values.dtype)


def sparse_delta_bwd(grad_y: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                     values: torch.Tensor, offsets: torch.Tensor, rank: int, seed: int,
                     distribution: str, scale: float, need_x: bool, need_values: bool,
                     interpret: bool, col_start: int = 0,
                     in_features: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_values); an empty tensor for a gradient not asked for. Arguments are
    already validated (mask/values/offsets contiguous). x holds A's columns
    [col_start, col_start + x.shape[-1]) of an A in_features wide (None: x's width)."""
    K, O = x.shape[-1], mask.shape[0]
    T = x.numel() // K
    n_in = K if in_features is None else in_features
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else x.new_empty((0,))
    gv = values.new_empty((0,))
    acc = acc_dtype_for(x.dtype)
    # fp64 (verification) keeps scale exact: applied afterwards in fp64.
    k_scale = 1.0 if acc == torch.float64 else scale
    if T == 0 or O == 0 or (need_values and values.numel() == 0 and not need_x):
        if need_x:
            gx.zero_()
        if need_values:
            gv = torch.zeros_like(values)
        return gx, gv
    gy2 = grad_y.reshape(T, O)
    cfg = config(T, rank, x.device, interpret)
    n_t, n_r = triton.cdiv(T, cfg.block_t), triton.cdiv(rank, cfg.block_r)
    n_o = triton.cdiv(O, cfg.block_o)
    words = spec.mask_words(rank)
    if need_x:
        split, per = plan_split(cfg, n_t * n_r, n_o, x.device, interpret)
        gh = torch.empty((split, T, rank), dtype=acc, device=x.device)
        gy_b_kernel[(n_t, n_r, split)](
            gy2, mask, values, offsets, gh, T, O, rank, values.numel(), gy2.stride(0),
            gy2.stride(1), n_o, per, WORDS=words, BLOCK_T=cfg.block_t, BLOCK_O=cfg.block_o,
            BLOCK_R=cfg.block_r)
        expand_a(gh, split, T, gx.view(T, K), rank, seed, distribution, n_in, col_start, k_scale,
                 cfg)
        if acc == torch.float64 and scale != 1.0:
            gx.mul_(scale)
    if need_values and values.numel() == 0:
        gv = torch.zeros_like(values)
    elif need_values:
        h, h_split = shrink(x.reshape(T, K), rank, seed, distribution, n_in, acc, interpret,
                            col_start)
        split, per = plan_split(cfg, n_o * n_r, n_t, x.device, interpret)
        # With offsets that agree with the mask every entry lies in exactly one (out, rank) tile
        # and is written by each split; corrupt offsets (unvalidated CUDA calls) leave entries
        # unwritten, which must read as 0, not as whatever the allocator held.
        gv_parts = torch.zeros((split, values.numel()), dtype=acc, device=x.device)
        gv_kernel[(n_o, n_r, split)](
            gy2, h, mask, offsets, gv_parts, T, O, rank, values.numel(), k_scale, gy2.stride(0),
            gy2.stride(1), n_t, per, h_split, WORDS=words, BLOCK_T=cfg.block_t,
            BLOCK_O=cfg.block_o, BLOCK_R=cfg.block_r)
        gv_acc = gv_parts[0] if split == 1 else gv_parts.sum(0)
        if acc == torch.float64 and scale != 1.0:
            gv_acc = gv_acc * scale
        gv = gv_acc if gv_acc.dtype == values.dtype else gv_acc.to(values.dtype)
    return gx, gv

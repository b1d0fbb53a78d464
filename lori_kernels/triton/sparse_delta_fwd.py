"""Triton forward of sparse_delta: y = scale * (x @ A^T) @ B^T, in two passes.

  shrink:  h (T, rank) = x (T, in) @ A^T      A generated per (rank tile, column tile)
  expand:  y (T, out)  = scale * h @ B^T      B decoded from (mask, values, offsets) per tile

like vLLM's lora_shrink / lora_expand. h stays in fp32 (fp64 for fp64 inputs); it is the only
intermediate written to memory (T x rank). A never is: each shrink program owns BLOCK_T tokens
and a range of column tiles (split-K), and generates each A tile (BLOCK_R x BLOCK_K) once and
uses it for all its BLOCK_T tokens (one tl.dot). Decode (T <= 16): one token block, the
columns split across programs (split-K) so that the Philox work spreads over the GPU.
Prefill: 64 tokens per A tile, so A is generated ceil(T / 64) times in all, small next to the
GEMM. Each split writes its own partial h and the expand pass sums the partials in a fixed
order: no atomics, results are bitwise reproducible run to run.

B tiles are decoded per (BLOCK_O x BLOCK_R) tile from (mask, values, offsets) by
common.b_tile and fed to tl.dot; shared device helpers and the launch configuration live in
common.py.

Precision: fp32 inputs use IEEE fp32 dots (no TF32); bf16/fp16 inputs feed the tensor cores
with A, h and gh rounded (to nearest even) to the input dtype, accumulating in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import spec
from .common import (INTERPRET, Config, acc_dtype_for, b_row_starts, b_tile, cast_rne,  # noqa: F401
                     config, force_config, jit, key_args, key_u32, load_rows, load_split_sum,
                     mm, plan_split, split_tiles, store_split_part)
from .random_a import a_tile_at, window_aligned

# INTERPRET (whether the kernels were decorated for the interpreter), Config and force_config
# are imported from here by the op registration and the tests.


# ---- kernels --------------------------------------------------------------------------------

@jit
def shrink_kernel(x_ptr, h_ptr, T, K, rank, stride_xt, stride_xk, k0, k1, mag, col_start,
                  n_ktiles, tiles_per_split, DIST: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr):
    """h[s, t, r] = sum_j x[t, j] A[r, col_start + j] over split s's column tiles (h is
    (split, T, rank)); x holds A's column window starting at col_start."""
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    key0 = key_u32(k0)
    key1 = key_u32(k1)
    DOT: tl.constexpr = x_ptr.dtype.element_ty
    ACC: tl.constexpr = h_ptr.dtype.element_ty
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    t_ok = offs_t < T
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
    acc = tl.zeros((BLOCK_T, BLOCK_R), ACC)
    kt0, kt1 = split_tiles(pid_s, tiles_per_split, n_ktiles)
    for kt in range(kt0, kt1):
        col0 = kt * BLOCK_K
        offs_k = col0 + tl.arange(0, BLOCK_K)
        xt = load_rows(x_rows, offs_k, stride_xk, K, t_ok)
        a = cast_rne(a_tile_at(key0, key1, rows, col_start + col0, mag, DIST, BLOCK_R, BLOCK_K,
                               ALIGNED), DOT)
        acc += mm(xt, tl.trans(a), ACC)
    store_split_part(h_ptr, pid_s, T, offs_t, rows, rank, acc, t_ok)


@jit
def expand_kernel(h_ptr, mask_ptr, values_ptr, offsets_ptr, y_ptr, T, n_out, rank, nnz, scale,
                  n_split, WORDS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    """y[t, o] = scale * sum_k h[t, k] B[o, k], B decoded per (BLOCK_O x BLOCK_R) tile;
    h = sum of the shrink's n_split partials."""
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    DOT: tl.constexpr = values_ptr.dtype.element_ty
    ACC: tl.constexpr = h_ptr.dtype.element_ty
    o0 = pid_o * BLOCK_O
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = o0 + tl.arange(0, BLOCK_O)
    t_ok = offs_t < T
    row_start = b_row_starts(mask_ptr, offsets_ptr, o0, offs_o, n_out, WORDS, BLOCK_O)
    acc = tl.zeros((BLOCK_T, BLOCK_O), ACC)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        bv = b_tile(mask_ptr, values_ptr, offsets_ptr, row_start, o0, offs_o, offs_r, n_out, rank,
                    nnz, WORDS, BLOCK_O, BLOCK_R)
        ht = load_split_sum(h_ptr, n_split, T * rank, offs_t, offs_r, rank,
                            t_ok[:, None] & (offs_r < rank)[None, :])
        acc += mm(cast_rne(ht, DOT), tl.trans(bv), ACC)
    y = acc * scale
    ptrs = y_ptr + offs_t.to(tl.int64)[:, None] * n_out + offs_o[None, :]
    tl.store(ptrs, cast_rne(y, y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & (offs_o < n_out)[None, :])


# ---- launches -------------------------------------------------------------------------------

def shrink(x2: torch.Tensor, rank: int, seed: int, distribution: str, in_features: int,
           acc_dtype: torch.dtype, interpret: bool,
           col_start: int = 0) -> tuple[torch.Tensor, int]:
    """(h_parts, split): h = x2 @ A_window^T = h_parts.sum(0) in acc_dtype, h_parts
    (split, T, rank). x2 is (T, width), any strides, A's columns [col_start, col_start + width)
    of an A in_features wide."""
    T, K = x2.shape
    cfg = config(T, rank, x2.device, interpret)
    n_t, n_r = triton.cdiv(T, cfg.block_t), triton.cdiv(rank, cfg.block_r)
    n_k = triton.cdiv(K, cfg.block_k)
    split, per = plan_split(cfg, n_t * n_r, n_k, x2.device, interpret)
    h = torch.empty((split, T, rank), dtype=acc_dtype, device=x2.device)
    k0, k1 = key_args(seed)
    shrink_kernel[(n_t, n_r, split)](
        x2, h, T, K, rank, x2.stride(0), x2.stride(1), k0, k1,
        spec.magnitude(distribution, in_features), col_start, n_k, per,
        DIST=spec.DISTRIBUTIONS[distribution], BLOCK_T=cfg.block_t, BLOCK_R=cfg.block_r,
        BLOCK_K=cfg.block_k, ALIGNED=window_aligned(col_start, distribution))
    return h, split


def sparse_delta_fwd(x: torch.Tensor, mask: torch.Tensor, values: torch.Tensor,
                     offsets: torch.Tensor, rank: int, seed: int, distribution: str,
                     scale: float, interpret: bool, col_start: int = 0,
                     in_features: int | None = None) -> torch.Tensor:
    """y (..., out) in x's dtype; arguments already validated. x holds A's columns
    [col_start, col_start + x.shape[-1]) of an A in_features wide (None: x's width)."""
    K, O = x.shape[-1], mask.shape[0]
    T = x.numel() // K
    y = torch.empty((*x.shape[:-1], O), dtype=x.dtype, device=x.device)
    if T == 0 or O == 0:
        return y
    acc = acc_dtype_for(x.dtype)
    n_in = K if in_features is None else in_features
    h, n_split = shrink(x.reshape(T, K), rank, seed, distribution, n_in, acc, interpret,
                        col_start)
    return expand_parts(h, n_split, T, mask, values, offsets, rank, scale, x.dtype, interpret,
                        y)


def expand_parts(h: torch.Tensor, n_split: int, T: int, mask: torch.Tensor, values: torch.Tensor,
                 offsets: torch.Tensor, rank: int, scale: float, out_dtype: torch.dtype,
                 interpret: bool, y: torch.Tensor | None = None) -> torch.Tensor:
    """y (T, out) (or into y, any (..., out) contiguous) = scale * (sum of h's n_split
    partials) @ B^T, in out_dtype; arguments already validated."""
    O = mask.shape[0]
    if y is None:
        y = torch.empty((T, O), dtype=out_dtype, device=h.device)
    if T == 0 or O == 0:
        return y
    acc = h.dtype
    cfg = config(T, rank, h.device, interpret)
    # fp64 (verification) keeps scale exact: applied afterwards in fp64.
    k_scale = 1.0 if acc == torch.float64 else scale
    expand_kernel[(triton.cdiv(T, cfg.block_t), triton.cdiv(O, cfg.block_o))](
        h, mask, values, offsets, y, T, O, rank, values.numel(), k_scale, n_split,
        WORDS=spec.mask_words(rank), BLOCK_T=cfg.block_t, BLOCK_O=cfg.block_o,
        BLOCK_R=cfg.block_r)
    if acc == torch.float64 and scale != 1.0:
        y.mul_(scale)
    return y

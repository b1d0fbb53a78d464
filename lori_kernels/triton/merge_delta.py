"""Triton merge_delta_: weight (out, in) += scale * B @ A, in place (LoRI merge; unmerge = -scale).

Grid (64-row chunks of B, column tiles of A). A program decodes its chunk's B rows per rank tile
(`b_row_starts` / `b_tile`, shared with sparse_delta), generates the matching A tile
(BLOCK_R x BLOCK_K, `a_tile`) and accumulates B @ A in fp32 (fp64 for fp64 weights); then it
reads its weight tile, adds scale * acc and rounds once into the weight. A is never written to
memory; it is generated once per (64-row chunk, column tile), i.e. out/64 times in all, which
is small next to the GEMM for a one-off merge.

Both dot operands are kept in the accumulation dtype (IEEE fp32, no TF32; B's bf16/fp16 values
and A's fp32 values convert exactly), as the C++ kernel does: merging is done once, so it
takes the accurate path rather than the tensor-core one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import spec
from .common import acc_dtype_for, b_row_starts, b_tile, cast_rne, jit, key_args, key_u32, mm
from .random_a import a_tile_at, window_aligned


@jit
def merge_kernel(w_ptr, mask_ptr, values_ptr, offsets_ptr, scale_ptr, n_out, K, rank, nnz,
                 stride_wo, stride_wk, k0, k1, mag, col_start, DIST: tl.constexpr,
                 WORDS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr):
    """w[o, j] = round(w[o, j] + scale * sum_k B[o, k] A[k, col_start + j]) for one (row block,
    column tile); w is the column shard of W starting at col_start.
    scale is read from a 1-element tensor in the accumulation dtype (a float kernel argument
    would be fp32, which would round a float64 merge's scale)."""
    pid_o = tl.program_id(0)
    pid_k = tl.program_id(1)
    key0 = key_u32(k0)
    key1 = key_u32(k1)
    ACC: tl.constexpr = scale_ptr.dtype.element_ty
    o0 = pid_o * BLOCK_O
    offs_o = o0 + tl.arange(0, BLOCK_O)
    col0 = pid_k * BLOCK_K
    offs_k = col0 + tl.arange(0, BLOCK_K)
    row_start = b_row_starts(mask_ptr, offsets_ptr, o0, offs_o, n_out, WORDS, BLOCK_O)
    acc = tl.zeros((BLOCK_O, BLOCK_K), ACC)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        # B is zero past rank, so A's rows past rank (finite values) add nothing.
        bv = b_tile(mask_ptr, values_ptr, offsets_ptr, row_start, o0, offs_o, offs_r, n_out, rank,
                    nnz, WORDS, BLOCK_O, BLOCK_R)
        a = a_tile_at(key0, key1, offs_r, col_start + col0, mag, DIST, BLOCK_R, BLOCK_K, ALIGNED)
        acc += mm(bv.to(ACC), a.to(ACC), ACC)
    ok = (offs_o < n_out)[:, None] & (offs_k < K)[None, :]
    ptrs = w_ptr + offs_o.to(tl.int64)[:, None] * stride_wo + offs_k.to(tl.int64)[None, :] * stride_wk
    w = tl.load(ptrs, mask=ok, other=0).to(ACC)
    tl.store(ptrs, cast_rne(w + acc * tl.load(scale_ptr), w_ptr.dtype.element_ty), mask=ok)


def merge_delta_(weight: torch.Tensor, mask: torch.Tensor, values: torch.Tensor,
                 offsets: torch.Tensor, rank: int, seed: int, distribution: str, scale: float,
                 interpret: bool, col_start: int = 0, in_features: int | None = None) -> None:
    """Launch (arguments already validated; mask/values/offsets contiguous). Any weight strides."""
    O, K = weight.shape
    if weight.numel() == 0:
        return
    acc = acc_dtype_for(weight.dtype)
    # torch.full, not torch.tensor: a device fill, no host-to-device copy.
    scale_t = torch.full((1,), scale, dtype=acc, device=weight.device)
    bk = 256 if interpret else 128          # a multiple of both distributions' E (128, 4)
    br = min(64, max(16, triton.next_power_of_2(rank)))
    k0, k1 = key_args(seed)
    merge_kernel[(spec.num_chunks(O), triton.cdiv(K, bk))](
        weight, mask, values, offsets, scale_t, O, K, rank, values.numel(), weight.stride(0),
        weight.stride(1), k0, k1, spec.magnitude(distribution, K if in_features is None
                                                 else in_features), col_start,
        DIST=spec.DISTRIBUTIONS[distribution], WORDS=spec.mask_words(rank), BLOCK_O=64,
        BLOCK_R=br, BLOCK_K=bk, ALIGNED=window_aligned(col_start, distribution))

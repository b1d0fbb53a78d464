"""A tiles from the seed (docs/spec_a.md) and the Triton kernel of random_a's fill.

`a_tile` is the one place the Triton backend turns Philox blocks into A's entries; the
sparse_delta kernels call it per (rank tile, column tile) and never write A to memory.

Element A[r, j] = f(Philox4x32-10(key=(seed lo32, seed hi32), counter=(j >> log2 E, r, dist, 0)))
  rademacher (dist 1, E = 128): bit j%32 of word (j/32)%4 set -> -s, clear -> +s
  uniform    (dist 2, E = 4):   fp32((2k + 1 - 2^23) * 2^-23) * b, k = word[j%4] >> 9
A tile covers columns [col0, col0 + BLOCK_K) with col0 a multiple of E and BLOCK_K a multiple
of E, so one Philox call feeds E elements: Philox runs on a (BLOCK_R, BLOCK_K / E) grid and the
words are broadcast over E and reshaped to (BLOCK_R, BLOCK_K).
"""
import torch
import triton
import triton.language as tl

from .. import spec
from .common import cast_rne, jit, key_args, key_u32, philox4x32_10

RADEMACHER = spec.DISTRIBUTIONS["rademacher"]
UNIFORM = spec.DISTRIBUTIONS["uniform"]


@triton.jit
def a_tile(k0, k1, rows, col0, mag, DIST: tl.constexpr, BLOCK_R: tl.constexpr,
           BLOCK_K: tl.constexpr):
    """fp32 A[rows, col0:col0+BLOCK_K] (rows: int32 (BLOCK_R,), k0/k1: uint32 key words).

    col0 must be a multiple of E (128 rademacher, 4 uniform), BLOCK_K a multiple of E.
    Rows/columns past A's edge get well-defined finite values; callers mask them."""
    r = rows.to(tl.uint32, bitcast=True)[:, None]
    if DIST == 1:
        NB: tl.constexpr = BLOCK_K // 128
        blk = ((col0 >> 7) + tl.arange(0, NB)).to(tl.uint32)[None, :]
        zero = tl.zeros((BLOCK_R, NB), tl.uint32)
        w0, w1, w2, w3 = philox4x32_10(blk + zero, r + zero, zero + 1, zero, k0, k1)
        jj = tl.arange(0, 128)[None, None, :]
        wi = jj >> 5
        word = tl.where(wi == 0, w0[:, :, None],
                        tl.where(wi == 1, w1[:, :, None],
                                 tl.where(wi == 2, w2[:, :, None], w3[:, :, None])))
        neg = ((word >> (jj & 31).to(tl.uint32)) & 1) != 0
        a = tl.where(neg, -mag, mag).to(tl.float32)
        return tl.reshape(a, (BLOCK_R, BLOCK_K))
    else:
        NB: tl.constexpr = BLOCK_K // 4
        blk = ((col0 >> 2) + tl.arange(0, NB)).to(tl.uint32)[None, :]
        zero = tl.zeros((BLOCK_R, NB), tl.uint32)
        w0, w1, w2, w3 = philox4x32_10(blk + zero, r + zero, zero + 2, zero, k0, k1)
        jj = tl.arange(0, 4)[None, None, :]
        word = tl.where(jj == 0, w0[:, :, None],
                        tl.where(jj == 1, w1[:, :, None],
                                 tl.where(jj == 2, w2[:, :, None], w3[:, :, None])))
        k = (word >> 9).to(tl.int32)
        unit = (2 * k + 1 - 8388608).to(tl.float32) * 1.1920928955078125e-07  # exact
        a = unit * mag  # one fp32 multiply, as in philox.h
        return tl.reshape(a, (BLOCK_R, BLOCK_K))


@triton.jit
def a_tile_at(k0, k1, rows, col0, mag, DIST: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr):
    """fp32 A[rows, col0:col0+BLOCK_K] for any col0 (a column window's A columns).

    ALIGNED (col0 a multiple of E): a_tile, one Philox call per E elements. Otherwise one
    Philox call per element (the tile straddles blocks at an offset only known at run time,
    and a register tile cannot be shifted by it): the price of a window that does not start
    on a Philox block edge (128 columns rademacher, 4 uniform)."""
    if ALIGNED:
        return a_tile(k0, k1, rows, col0, mag, DIST, BLOCK_R, BLOCK_K)
    else:
        r = rows.to(tl.uint32, bitcast=True)[:, None]
        cols = (col0 + tl.arange(0, BLOCK_K)).to(tl.uint32)[None, :]
        zero = tl.zeros((BLOCK_R, BLOCK_K), tl.uint32)
        if DIST == 1:
            w0, w1, w2, w3 = philox4x32_10((cols >> 7) + zero, r + zero, zero + 1, zero, k0, k1)
            wi = (cols >> 5) & 3
            word = tl.where(wi == 0, w0, tl.where(wi == 1, w1, tl.where(wi == 2, w2, w3)))
            neg = ((word >> (cols & 31)) & 1) != 0
            return tl.where(neg, -mag, mag).to(tl.float32)
        else:
            w0, w1, w2, w3 = philox4x32_10((cols >> 2) + zero, r + zero, zero + 2, zero, k0, k1)
            wi = cols & 3
            word = tl.where(wi == 0, w0, tl.where(wi == 1, w1, tl.where(wi == 2, w2, w3)))
            k = (word >> 9).to(tl.int32)
            unit = (2 * k + 1 - 8388608).to(tl.float32) * 1.1920928955078125e-07  # exact
            return unit * mag


def window_aligned(col_start: int, distribution: str) -> bool:
    """Whether a window starting at A column col_start lets kernels use a_tile (their tiles are
    multiples of 128 columns, so col_start a multiple of E keeps every tile block-aligned)."""
    return col_start % spec.ELEMS_PER_BLOCK[distribution] == 0


@jit
def _random_a_fill_kernel(out_ptr, stride_r, stride_c, rank, col_start, ncols, k0, k1, mag,
                          DIST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                          E: tl.constexpr):
    """out[r, c] = A[r, col_start + c]; programs tile absolute columns from an E-aligned start."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = (col_start // E) * E + pid_c * BLOCK_K
    a = a_tile(key_u32(k0), key_u32(k1), rows, col0, mag, DIST, BLOCK_R, BLOCK_K)
    c = col0 + tl.arange(0, BLOCK_K) - col_start
    ok = (rows < rank)[:, None] & ((c >= 0) & (c < ncols))[None, :]
    ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_r + c[None, :].to(tl.int64) * stride_c
    tl.store(ptrs, cast_rne(a, out_ptr.dtype.element_ty), mask=ok)


def block_k(dist_id: int, interpret: bool) -> int:
    """Column tile of A: a multiple of both E's (128)."""
    return 256 if interpret else 128


def random_a_fill(out: torch.Tensor, seed: int, in_features: int, col_start: int,
                  distribution: str, interpret: bool) -> None:
    """Launch the fill (arguments already validated): out = A[:, col_start:col_start+ncols]."""
    rank, ncols = out.shape
    if out.numel() == 0:
        return
    dist_id = spec.DISTRIBUTIONS[distribution]
    e = spec.ELEMS_PER_BLOCK[distribution]
    bk = block_k(dist_id, interpret)
    br = min(64, max(16, triton.next_power_of_2(rank)))
    first = (col_start // e) * e
    n_ctiles = triton.cdiv(col_start + ncols - first, bk)
    k0, k1 = key_args(seed)
    grid = (triton.cdiv(rank, br), n_ctiles)
    _random_a_fill_kernel[grid](out, out.stride(0), out.stride(1), rank, col_start, ncols, k0, k1,
                                spec.magnitude(distribution, in_features), DIST=dist_id,
                                BLOCK_R=br, BLOCK_K=bk, E=e)


@triton.jit
def a_tile_any(k0, k1, rows, col0, dist, mag_r, mag_u, BLOCK_R: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """a_tile with the distribution a runtime value (1 rademacher, else uniform): the batched
    kernels' adapters differ in distribution. `dist` is uniform across a program, so this is a
    branch, not a divergent select; both paths are compiled."""
    if dist == 1:
        a = a_tile(k0, k1, rows, col0, mag_r, 1, BLOCK_R, BLOCK_K)
    else:
        a = a_tile(k0, k1, rows, col0, mag_u, 2, BLOCK_R, BLOCK_K)
    return a

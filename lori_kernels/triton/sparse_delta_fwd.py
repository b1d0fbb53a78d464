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

B tile decode (`b_row_starts` + `b_tile_index`): a program's output rows lie inside one
64-row chunk c; row o's first value is offsets[c] + popcounts of the chunk's rows before o,
and entry (o, k) sits at that start + popcount of the row's mask bits below k. Dense
(BLOCK_O x BLOCK_R) tiles of B are then gathered from `values` (zeros off the mask) and fed to
tl.dot. Popcounts use SWAR bit tricks (no libdevice), so all of it runs in the interpreter.

Precision: fp32 inputs use IEEE fp32 dots (no TF32); bf16/fp16 inputs feed the tensor cores
with A, h and gh rounded (to nearest even) to the input dtype, accumulating in fp32.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .. import spec
from .philox import cast_rne, key_args, key_u32, popcount32
from .random_a import a_tile


# The interpreter multiplies bfloat16 operands of tl.dot as their uint16 bit patterns; there
# (only) bf16 operands are widened to fp32 first, which is exact.
INTERPRET: tl.constexpr = tl.constexpr(bool(triton.knobs.runtime.interpret))


@triton.jit
def mm(a, b, ACC: tl.constexpr):
    """a @ b accumulated in ACC (fp32, or fp64 for fp64 operands); fp32 operands use IEEE fp32
    (no TF32), bf16/fp16 operands the tensor cores."""
    if INTERPRET and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=ACC)
    else:
        return tl.dot(a, b, input_precision="ieee", out_dtype=ACC)


# ---- B decode -------------------------------------------------------------------------------

@triton.jit
def b_row_starts(mask_ptr, offsets_ptr, o0, offs_o, n_out, WORDS: tl.constexpr,
                 BLOCK_O: tl.constexpr):
    """Index in `values` of the first entry of each row offs_o = o0 + arange(BLOCK_O).

    Requires the rows to lie in chunk o0 // 64 (BLOCK_O divides 64, o0 a multiple of it)."""
    chunk = o0 // 64
    start = tl.load(offsets_ptr + chunk)
    if BLOCK_O < 64:  # entries of the chunk's rows before o0
        pre = chunk * 64 + tl.arange(0, 64)
        for w in tl.static_range(WORDS):
            m = tl.load(mask_ptr + pre * WORDS + w, mask=pre < o0, other=0)
            start += tl.sum(popcount32(m.to(tl.uint32, bitcast=True)), axis=0)
    rowcnt = tl.zeros((BLOCK_O,), tl.int32)
    for w in tl.static_range(WORDS):
        m = tl.load(mask_ptr + offs_o * WORDS + w, mask=offs_o < n_out, other=0)
        rowcnt += popcount32(m.to(tl.uint32, bitcast=True))
    return start + tl.cumsum(rowcnt, axis=0) - rowcnt


@triton.jit
def b_tile_index(mask_ptr, row_start, offs_o, offs_r, n_out, rank, WORDS: tl.constexpr,
                 BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """(idx, present) for the B tile rows offs_o x columns offs_r: present[i, j] iff (o, k) is
    on the mask; idx[i, j] is then its position in `values`."""
    row_ok = offs_o < n_out
    widx = offs_r >> 5
    wpre = tl.zeros((BLOCK_O, BLOCK_R), tl.int32)  # entries in earlier words
    if WORDS > 1:
        for w in tl.static_range(WORDS - 1):
            m = tl.load(mask_ptr + offs_o * WORDS + w, mask=row_ok, other=0)
            pc = popcount32(m.to(tl.uint32, bitcast=True))
            wpre += tl.where(widx[None, :] > w, pc[:, None], 0)
    ok = row_ok[:, None] & (offs_r < rank)[None, :]
    word = tl.load(mask_ptr + offs_o[:, None] * WORDS + widx[None, :], mask=ok, other=0)
    word = word.to(tl.uint32, bitcast=True)
    bit = (offs_r & 31).to(tl.uint32)[None, :]
    present = ((word >> bit) & 1) != 0
    below = word & ((tl.full((), 1, tl.uint32) << bit) - 1)
    return row_start[:, None] + wpre + popcount32(below), present


@triton.jit
def b_tile(mask_ptr, values_ptr, row_start, offs_o, offs_r, n_out, rank, nnz,
           WORDS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """Dense B[offs_o, offs_r] in values' dtype (zeros off the mask). Reads stay inside
    values[0:nnz] even for offsets that disagree with the mask (validated on the host)."""
    idx, present = b_tile_index(mask_ptr, row_start, offs_o, offs_r, n_out, rank, WORDS,
                                BLOCK_O, BLOCK_R)
    return tl.load(values_ptr + idx, mask=present & (idx >= 0) & (idx < nnz), other=0)


# ---- split reductions and masked tile loads ------------------------------------------------

@triton.jit
def load_split_sum(ptr, n_split, split_stride, offs_t, offs_c, n_cols, mask):
    """sum_s ptr[s * split_stride + t * n_cols + c] over the n_split partial results of a split
    reduction, added in split order (deterministic)."""
    ptrs = ptr + offs_t.to(tl.int64)[:, None] * n_cols + offs_c[None, :]
    acc = tl.load(ptrs, mask=mask, other=0)
    for _ in range(1, n_split):
        ptrs += split_stride
        acc += tl.load(ptrs, mask=mask, other=0)
    return acc


@triton.jit
def store_split_part(ptr, split, n_rows, offs_t, offs_c, n_cols, acc, t_ok):
    """ptr[split, t, c] = acc for rows offs_t (where t_ok) and columns offs_c < n_cols of a
    (n_split, n_rows, n_cols) buffer of partial results, the ones load_split_sum adds up."""
    ptrs = ptr + split.to(tl.int64) * n_rows * n_cols + offs_t.to(tl.int64)[:, None] * n_cols \
        + offs_c[None, :]
    tl.store(ptrs, acc, mask=t_ok[:, None] & (offs_c < n_cols)[None, :])


@triton.jit
def split_tiles(pid_s, tiles_per_split, n_tiles):
    """[first, end) tiles of split pid_s of a reduction over n_tiles tiles (see plan_split)."""
    t0 = pid_s * tiles_per_split
    return t0, tl.minimum(t0 + tiles_per_split, n_tiles)


@triton.jit
def load_rows(row_ptrs, offs_c, stride_c, n_cols, row_ok):
    """Tile row_ptrs[i] + offs_c[j] * stride_c (row_ptrs a column of row pointers), 0 outside
    the rows row_ok and columns [0, n_cols)."""
    return tl.load(row_ptrs + offs_c.to(tl.int64)[None, :] * stride_c,
                   mask=row_ok[:, None] & (offs_c < n_cols)[None, :], other=0)


# ---- kernels --------------------------------------------------------------------------------

@triton.jit
def shrink_kernel(x_ptr, h_ptr, T, K, rank, stride_xt, stride_xk, k0, k1, mag, n_ktiles,
                  tiles_per_split, DIST: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """h[s, t, r] = sum_j x[t, j] A[r, j] over split s's column tiles (h is (split, T, rank))."""
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
        a = cast_rne(a_tile(key0, key1, rows, col0, mag, DIST, BLOCK_R, BLOCK_K), DOT)
        acc += mm(xt, tl.trans(a), ACC)
    store_split_part(h_ptr, pid_s, T, offs_t, rows, rank, acc, t_ok)


@triton.jit
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
        bv = b_tile(mask_ptr, values_ptr, row_start, offs_o, offs_r, n_out, rank, nnz, WORDS,
                    BLOCK_O, BLOCK_R)
        ht = load_split_sum(h_ptr, n_split, T * rank, offs_t, offs_r, rank,
                            t_ok[:, None] & (offs_r < rank)[None, :])
        acc += mm(cast_rne(ht, DOT), tl.trans(bv), ACC)
    y = acc * scale
    ptrs = y_ptr + offs_t.to(tl.int64)[:, None] * n_out + offs_o[None, :]
    tl.store(ptrs, cast_rne(y, y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & (offs_o < n_out)[None, :])


# ---- launch configuration ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes and splits; None = chosen from the shape (see `config`)."""
    block_t: int | None = None
    block_k: int | None = None   # multiple of 128 (both distributions' E divide it)
    block_r: int | None = None   # power of two in [16, 64]
    block_o: int | None = None   # 16, 32 or 64 (divides the 64-row chunk)
    split: int | None = None     # split of the reduced axis (K, out or T) across programs


_forced: Config | None = None


@contextlib.contextmanager
def force_config(cfg: Config):
    """Use these tile sizes/splits for every launch inside the block (tests, tuning)."""
    global _forced
    old, _forced = _forced, cfg
    try:
        yield
    finally:
        _forced = old


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def config(T: int, rank: int, device: torch.device, interpret: bool) -> Config:
    """Shape-based defaults. Decode (T <= 16): 16-token blocks. Prefill: 64-token blocks, so
    each A tile feeds 64 tokens. Under the interpreter, few large programs run fastest."""
    f = _forced or Config()
    if interpret:
        bt = min(64, max(16, triton.next_power_of_2(max(T, 1))))
    else:
        bt = 16 if T <= 16 else (32 if T <= 32 else 64)
    bt = f.block_t or bt
    bk = f.block_k or (256 if interpret else 128)
    br = f.block_r or min(64, max(16, triton.next_power_of_2(rank)))
    bo = f.block_o or 64
    if bk % 128 or bo not in (16, 32, 64) or br not in (16, 32, 64, 128) or bt < 16 \
            or bt & (bt - 1):
        raise ValueError(f"bad Triton tile config {f}: block_k a multiple of 128, block_o in "
                         "(16, 32, 64), block_r in (16, 32, 64, 128), block_t a power of 2 >= 16")
    return Config(bt, bk, br, bo, f.split)


def pick_split(cfg: Config, programs: int, n_tiles: int, device: torch.device,
               interpret: bool) -> int:
    """Split a reduction of n_tiles tiles so that about 2 programs per SM run."""
    if cfg.split is not None:
        return max(1, min(cfg.split, n_tiles))
    if interpret or n_tiles <= 1:
        return 1
    want = triton.cdiv(2 * _sm_count(device), max(programs, 1))
    return max(1, min(want, n_tiles))


def plan_split(cfg: Config, programs: int, n_tiles: int, device: torch.device,
               interpret: bool) -> tuple[int, int]:
    """(split, tiles_per_split) of a reduction of n_tiles tiles: pick_split's split, then
    trimmed so that no split is left without tiles."""
    per = triton.cdiv(n_tiles, pick_split(cfg, programs, n_tiles, device, interpret))
    return triton.cdiv(n_tiles, per), per


def shrink(x2: torch.Tensor, rank: int, seed: int, distribution: str, in_features: int,
           acc_dtype: torch.dtype, interpret: bool) -> tuple[torch.Tensor, int]:
    """(h_parts, split): h = x2 @ A^T = h_parts.sum(0) in acc_dtype, h_parts (split, T, rank).
    x2 is (T, in_features), any strides."""
    T, K = x2.shape
    cfg = config(T, rank, x2.device, interpret)
    n_t, n_r = triton.cdiv(T, cfg.block_t), triton.cdiv(rank, cfg.block_r)
    n_k = triton.cdiv(K, cfg.block_k)
    split, per = plan_split(cfg, n_t * n_r, n_k, x2.device, interpret)
    h = torch.empty((split, T, rank), dtype=acc_dtype, device=x2.device)
    k0, k1 = key_args(seed)
    shrink_kernel[(n_t, n_r, split)](
        x2, h, T, K, rank, x2.stride(0), x2.stride(1), k0, k1,
        spec.magnitude(distribution, in_features), n_k, per,
        DIST=spec.DISTRIBUTIONS[distribution], BLOCK_T=cfg.block_t, BLOCK_R=cfg.block_r,
        BLOCK_K=cfg.block_k)
    return h, split


def acc_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sparse_delta_fwd(x: torch.Tensor, mask: torch.Tensor, values: torch.Tensor,
                     offsets: torch.Tensor, rank: int, seed: int, distribution: str,
                     scale: float, interpret: bool) -> torch.Tensor:
    """y (..., out) in x's dtype; arguments already validated."""
    K, O = x.shape[-1], mask.shape[0]
    T = x.numel() // K
    y = torch.empty((*x.shape[:-1], O), dtype=x.dtype, device=x.device)
    if T == 0 or O == 0:
        return y
    acc = acc_dtype_for(x.dtype)
    h, n_split = shrink(x.reshape(T, K), rank, seed, distribution, K, acc, interpret)
    cfg = config(T, rank, x.device, interpret)
    # fp64 (verification) keeps scale exact: applied afterwards in fp64.
    k_scale = 1.0 if acc == torch.float64 else scale
    expand_kernel[(triton.cdiv(T, cfg.block_t), triton.cdiv(O, cfg.block_o))](
        h, mask, values, offsets, y, T, O, rank, values.numel(), k_scale, n_split,
        WORDS=spec.mask_words(rank), BLOCK_T=cfg.block_t, BLOCK_O=cfg.block_o,
        BLOCK_R=cfg.block_r)
    if acc == torch.float64 and scale != 1.0:
        y.mul_(scale)
    return y

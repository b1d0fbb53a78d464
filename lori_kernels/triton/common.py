"""Helpers every Triton pass shares: Philox4x32-10, 32-bit bit tricks, rounding, the sparse-B
tile decode, split reductions, masked tile loads, and the launch configuration.

Device functions are written for both the pinned Triton and Triton 3.6 (the GPU machine's):
nothing here uses a name only newer releases have (e.g. tl.to_tensor), and nothing uses
libdevice (popc, ...), so the same lines also run under TRITON_INTERPRET=1 on CPU tensors.

Philox is written out with tl.umulhi rather than tl.randint4x: the spec's counter layout is
(column block, row, dist_id, 0) (docs/spec_a.md), and randint4x only takes a (offset, 0, 0, 0)
counter. Every Philox value is tl.uint32, so products and sums wrap modulo 2**32 exactly as in
csrc/include/lori/philox.h.

B tile decode (`b_row_starts`, `b_tile_index`, `b_tile`): a program's output rows lie inside
one 64-row chunk c; row o's first value is offsets[c] + popcounts of the chunk's rows before o,
and entry (o, k) sits at that start + popcount of the row's mask bits below k. Every read and
write of `values` is bounded by the chunk's [offsets[c], offsets[c+1]) (clamped to
[0, nnz)): offsets that disagree with the mask give wrong numbers, never a read of another
chunk's values or past the buffer (docs/spec_b.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import triton
import triton.language as tl

# The interpreter multiplies bfloat16 operands of tl.dot as their uint16 bit patterns; there
# (only) bf16 operands are widened to fp32 first, which is exact.
INTERPRET: tl.constexpr = tl.constexpr(bool(triton.knobs.runtime.interpret))

# Random123's Philox4x32 constants (as in philox.h); tl.constexpr so @jit code may read them.
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)

# Integer kernel arguments that must not create JIT variants: the JIT compiles a separate
# kernel for each argument equal to 1 and for each divisible by 16, so seed words, token
# counts, loop bounds and splits would multiply the variants (each a 0.4-2 s sm_90 compile)
# without making any code faster. Row strides and row lengths that address large tensors
# keep their divisibility specialization: it is what lets the compiler vectorize those loads.
NO_SPECIALIZE = ("k0", "k1", "T", "nnz", "n_values", "col_start", "ncols", "rank", "n_ktiles",
                 "n_otiles", "n_ttiles", "tiles_per_split", "n_split", "h_split")


def jit(fn):
    """triton.jit with the arguments named in NO_SPECIALIZE (those the kernel has) left
    unspecialized."""
    import inspect
    names = [n for n in inspect.signature(fn).parameters if n in NO_SPECIALIZE]
    return triton.jit(fn, do_not_specialize=names)


# ---- Philox4x32-10, bit tricks, rounding ---------------------------------------------------

def key_args(seed_i64: int) -> tuple[int, int]:
    """The op's int64 seed (uint64 bit pattern) -> Philox key words as int32 bit patterns.

    Kernels take the key as two int32 arguments (a Python int >= 2**31 would be typed i64)
    and bitcast them back to uint32 with `key_u32`."""
    u = seed_i64 % (1 << 64)
    lo, hi = u & 0xFFFFFFFF, u >> 32
    return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in (lo, hi))


@triton.jit
def key_u32(k):
    """An int32 kernel argument holding a key word -> the uint32 key word. Adding an int32
    zero makes it a tensor even when the JIT passed it as a constant (a specialized argument
    equal to 1); tl.to_tensor would do the same but Triton 3.6 lacks it."""
    return (k + tl.zeros((), tl.int32)).to(tl.uint32, bitcast=True)


@triton.jit
def key_from_seed(seed):
    """An int64 seed loaded from a tensor (the uint64 bit pattern) -> Philox key words (uint32)."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return k0, k1


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (c0..c3 broadcastable, k0/k1 uint32 scalars).

    Round: hi0,lo0 = mulhilo(M0, c0); hi1,lo1 = mulhilo(M1, c2);
    c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); the key is bumped between rounds."""
    m0 = tl.full((), PHILOX_M0, tl.uint32)
    m1 = tl.full((), PHILOX_M1, tl.uint32)
    w0 = tl.full((), PHILOX_W0, tl.uint32)
    w1 = tl.full((), PHILOX_W1, tl.uint32)
    for rnd in tl.static_range(10):
        if rnd > 0:
            k0 = tl.add(k0, w0, sanitize_overflow=False)
            k1 = tl.add(k1, w1, sanitize_overflow=False)
        hi0 = tl.umulhi(c0, m0)
        lo0 = tl.mul(c0, m0, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, m1)
        lo1 = tl.mul(c2, m1, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def popcount32(x):
    """Set bits of each uint32 (SWAR; libdevice's popc does not run in the interpreter)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return (tl.mul(x, 0x01010101, sanitize_overflow=False) >> 24).to(tl.int32)


@triton.jit
def cast_rne(v, DTYPE: tl.constexpr):
    """fp32 -> DTYPE rounded to nearest even. bfloat16 goes through integer bit tricks: the
    interpreter's fp32->bf16 cast truncates, and A must round exactly as c10::BFloat16 does."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(v != v, 0x7FC0, rounded)  # keep NaNs NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


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
def chunk_bounds(offsets_ptr, o0, nnz):
    """[lo, hi) of the values of the 64-row chunk holding row o0: [offsets[c], offsets[c+1])
    clamped to [0, nnz), the only values that chunk's rows may read or write."""
    chunk = o0 // 64
    lo = tl.minimum(tl.maximum(tl.load(offsets_ptr + chunk).to(tl.int64), 0), nnz)
    hi = tl.minimum(tl.maximum(tl.load(offsets_ptr + chunk + 1).to(tl.int64), lo), nnz)
    return lo, hi


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
def b_tile_slots(mask_ptr, offsets_ptr, row_start, o0, offs_o, offs_r, n_out, rank, nnz,
                 WORDS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """(idx, ok): positions in `values` of the B tile's entries, and which of them exist and
    lie inside their chunk's value range (`chunk_bounds`): only those may be read or written."""
    idx, present = b_tile_index(mask_ptr, row_start, offs_o, offs_r, n_out, rank, WORDS,
                                BLOCK_O, BLOCK_R)
    lo, hi = chunk_bounds(offsets_ptr, o0, nnz)
    return idx, present & (idx >= lo) & (idx < hi)


@triton.jit
def b_tile(mask_ptr, values_ptr, offsets_ptr, row_start, o0, offs_o, offs_r, n_out, rank, nnz,
           WORDS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """Dense B[offs_o, offs_r] in values' dtype (zeros off the mask), read only from the
    chunk's [offsets[c], offsets[c+1]) inside values[0:nnz]."""
    idx, ok = b_tile_slots(mask_ptr, offsets_ptr, row_start, o0, offs_o, offs_r, n_out, rank,
                           nnz, WORDS, BLOCK_O, BLOCK_R)
    return tl.load(values_ptr + idx, mask=ok, other=0)


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


def acc_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32

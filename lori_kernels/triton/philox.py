"""Philox4x32-10 and 32-bit bit tricks as Triton device functions (docs/spec_a.md).

Written out with tl.umulhi rather than tl.randint4x: the spec's counter layout is
(column block, row, dist_id, 0), and randint4x only takes a (offset, 0, 0, 0) counter.
Every value here is tl.uint32, so products and sums wrap modulo 2**32 exactly as in
csrc/include/lori/philox.h. Nothing uses libdevice (popc, ...), so the same lines run
under TRITON_INTERPRET=1 on CPU tensors.
"""
import triton
import triton.language as tl

# Random123's Philox4x32 constants (as in philox.h); tl.constexpr so @jit code may read them.
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


def key_args(seed_i64: int) -> tuple[int, int]:
    """The op's int64 seed (uint64 bit pattern) -> Philox key words as int32 bit patterns.

    Kernels take the key as two int32 arguments (a Python int >= 2**31 would be typed i64)
    and bitcast them back to uint32 with `key_u32`."""
    u = seed_i64 % (1 << 64)
    lo, hi = u & 0xFFFFFFFF, u >> 32
    return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in (lo, hi))


@triton.jit
def key_u32(k):
    """An int32 kernel argument holding a key word -> the uint32 key word. (to_tensor: Triton
    passes an int argument equal to 1 as a constant.)"""
    return tl.to_tensor(k).to(tl.int32).to(tl.uint32, bitcast=True)


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
def key_from_seed(seed):
    """An int64 seed loaded from a tensor (the uint64 bit pattern) -> Philox key words (uint32)."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return k0, k1

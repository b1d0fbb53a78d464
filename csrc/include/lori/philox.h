// Philox4x32-10 and the A spec (docs/spec_a.md), for host and device.
//
// Everything here compiles for C++ and CUDA alike, so the CPU tests exercise the
// same lines the GPU kernels run. Do not change a constant or a bit position here
// without bumping the A spec version: stored adapters would silently change.
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LORI_HD __host__ __device__ __forceinline__
#else
#define LORI_HD inline
#endif

namespace lori {

constexpr int kASpecVersion = 1;

// Random123's Philox4x32 constants.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct U32x4 {
  uint32_t v[4];
};

LORI_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Philox4x32 with 10 rounds; key (k0, k1) is bumped between rounds, not before the first.
LORI_HD U32x4 philox4x32_10(U32x4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c.v[0], hi0, lo0);
    mulhilo32(kPhiloxM1, c.v[2], hi1, lo1);
    const U32x4 n = {{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
    c = n;
  }
  return c;
}

// ---- The A spec -----------------------------------------------------------------
// A has shape (rank, in_features). Element A[r, j] is drawn from Philox4x32-10 with
//   key     = (seed & 0xffffffff, seed >> 32)          (seed: 64-bit unsigned)
//   counter = (j / E, r, dist_id, 0)                   E = elements per Philox block
// and the element's bits are taken from that block's 128 output bits.

enum Distribution : int32_t {
  kRademacher = 1,  // +-s, one bit per element, E = 128
  kUniform = 2,     // U(-b, b) quantized to 2^23 levels, 32 bits per element, E = 4
};

// Elements per Philox block, as a shift (E = 1 << shift).
LORI_HD int elems_per_block_log2(int dist) { return dist == kRademacher ? 7 : 2; }

LORI_HD U32x4 a_block(uint32_t k0, uint32_t k1, int dist, uint32_t block, uint32_t row) {
  const U32x4 c = {{block, row, static_cast<uint32_t>(dist), 0u}};
  return philox4x32_10(c, k0, k1);
}

// Uniform: the odd integer 2k+1-2^23 (k = top 23 bits of the word) times 2^-23, an exact
// fp32 value in (-1, 1), symmetric about 0. The element is fp32(unit * b).
LORI_HD float uniform_unit(uint32_t word) {
  const int32_t k = static_cast<int32_t>(word >> 9);
  return static_cast<float>(2 * k + 1 - (1 << 23)) * 1.1920928955078125e-07f;  // 2^-23
}

// Rademacher: bit set -> -s, bit clear -> +s. Element j of a block uses
// bit (j % 32) of word (j / 32) % 4 (LSB first).
LORI_HD bool rademacher_negative(const U32x4& blk, uint32_t j) {
  return (blk.v[(j >> 5) & 3] >> (j & 31)) & 1u;
}

// The fp32 magnitude of A: b = 1/sqrt(in) (uniform) or s = 1/sqrt(3 in) (Rademacher),
// computed in float64 and rounded once to fp32. Host-side: kernels receive it as an argument.
inline float a_magnitude(int dist, int64_t in_features) {
  const double n = static_cast<double>(in_features) * (dist == kRademacher ? 3.0 : 1.0);
  return static_cast<float>(1.0 / std::sqrt(n));
}

// One element of A in fp32, straight from the spec (reference path; kernels vectorize this).
LORI_HD float a_element(uint32_t k0, uint32_t k1, int dist, float magnitude, uint32_t row,
                        uint32_t col) {
  const int shift = elems_per_block_log2(dist);
  const U32x4 blk = a_block(k0, k1, dist, col >> shift, row);
  if (dist == kRademacher) {
    return rademacher_negative(blk, col & 127u) ? -magnitude : magnitude;
  }
  return uniform_unit(blk.v[col & 3u]) * magnitude;
}

}  // namespace lori

// AVX-512 kernel of the x -> h stage: Rademacher A-row dots for the direct path (<= 16 tokens;
// the AVX2 version is dot_group_avx2 in delta_common.cpp).
// GCC 12's AVX-512 headers build masked loads on _mm512_undefined_*(), which -Wuninitialized
// flags at every inlined use (a known false positive): silence it for this file only.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "avx512.h"
#include "simd512.h"

namespace lori::cpu {

namespace {

// Sign dot of NT tokens, sum_j (+-x[t, j]) with A's sign bits (bit set -> negative): each
// sign flips x's sign bit (a masked xor) before one add per 16 elements, as dot_group_avx2
// does. Every term is exact, so inf/NaN and near-overflow inputs give what a sum of +-x gives
// (summing x once and subtracting twice its negative part turns one inf into NaN and
// overflows near the fp32 maximum where the answer is 0). NT == 1: four accumulators, 64
// columns a step; NT == 4: two per token. Accumulator indices are compile-time constants (a
// run-time index sends them through the stack).
template <int NT>
LORI_AVX512 void sign_dot_group(const float* x, int64_t n, int64_t ldx, const uint32_t* signs,
                                float magnitude, float* out) {
  constexpr int NA = NT == 1 ? 4 : 2;
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
  __m512 acc[NT][NA];
  for (int t = 0; t < NT; ++t) {
    for (int a = 0; a < NA; ++a) acc[t][a] = _mm512_setzero_ps();
  }
  int64_t j = 0;
  if constexpr (NT == 1) {
    for (; j + 64 <= n; j += 64) {
      const uint64_t w = static_cast<uint64_t>(signs[j >> 5]) |
                         (static_cast<uint64_t>(signs[(j >> 5) + 1]) << 32);
      for (int a = 0; a < 4; ++a) {
        const __mmask16 k = static_cast<__mmask16>(w >> (16 * a));
        const __m512 xv = _mm512_loadu_ps(x + j + 16 * a);
        acc[0][a] = _mm512_add_ps(acc[0][a], _mm512_mask_xor_ps(xv, k, xv, sign));
      }
    }
  }
  for (; j + 32 <= n; j += 32) {
    const uint32_t w = signs[j >> 5];
    const __mmask16 k0 = static_cast<__mmask16>(w), k1 = static_cast<__mmask16>(w >> 16);
    for (int t = 0; t < NT; ++t) {
      const float* xt = x + t * ldx + j;
      const __m512 x0 = _mm512_loadu_ps(xt), x1 = _mm512_loadu_ps(xt + 16);
      acc[t][0] = _mm512_add_ps(acc[t][0], _mm512_mask_xor_ps(x0, k0, x0, sign));
      acc[t][1] = _mm512_add_ps(acc[t][1], _mm512_mask_xor_ps(x1, k1, x1, sign));
    }
  }
  if (j < n) {  // tail: only lanes below n are loaded (masked loads do not fault past them)
    const uint32_t w = signs[j >> 5];
    const int64_t rem = n - j;
    const __mmask16 l0 = static_cast<__mmask16>(rem >= 16 ? 0xffff : (1u << rem) - 1u);
    const __mmask16 l1 = static_cast<__mmask16>(rem <= 16 ? 0 : (1u << (rem - 16)) - 1u);
    const __mmask16 k0 = static_cast<__mmask16>(w) & l0, k1 = static_cast<__mmask16>(w >> 16) & l1;
    for (int t = 0; t < NT; ++t) {
      const float* xt = x + t * ldx + j;
      const __m512 x0 = _mm512_maskz_loadu_ps(l0, xt), x1 = _mm512_maskz_loadu_ps(l1, xt + 16);
      acc[t][0] = _mm512_add_ps(acc[t][0], _mm512_mask_xor_ps(x0, k0, x0, sign));
      acc[t][1] = _mm512_add_ps(acc[t][1], _mm512_mask_xor_ps(x1, k1, x1, sign));
    }
  }
  for (int t = 0; t < NT; ++t) {
    __m512 s = acc[t][0];
    for (int a = 1; a < NA; ++a) s = _mm512_add_ps(s, acc[t][a]);
    out[t] = hsum16(s) * magnitude;
  }
}

}  // namespace

LORI_AVX512 void dot_rows_signs_avx512(const float* x, int64_t T, int64_t n, int64_t ldx,
                                       const uint32_t* signs, float magnitude, float* out) {
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) sign_dot_group<4>(x + t * ldx, n, ldx, signs, magnitude, out + t);
  for (; t < T; ++t) sign_dot_group<1>(x + t * ldx, n, ldx, signs, magnitude, out + t);
}

}  // namespace lori::cpu

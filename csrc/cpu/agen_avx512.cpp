// AVX-512 Philox: 16 counters a step (the AVX2 version, 8 a step, is in agen.cpp).
// GCC 12's AVX-512 headers build masked loads on _mm512_undefined_*(), which -Wuninitialized
// flags at every inlined use (a known false positive): silence it for this file only.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "agen.h"
#include "avx512.h"
#include "lori/philox.h"
#include "simd512.h"

namespace lori::cpu {

namespace {

LORI_AVX512 inline void mulhilo16(__m512i m, __m512i c, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(c, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

LORI_AVX512 void philox16(uint32_t k0, uint32_t k1, __m512i c0, __m512i c1, __m512i c2,
                          __m512i c3, uint32_t* words) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    __m512i hi0, lo0, hi1, lo1;
    mulhilo16(m0, c0, hi0, lo0);
    mulhilo16(m1, c2, hi1, lo1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
  }
  // 4 x 16 (word-major) -> 16 x 4 (counter-major).
  const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
  const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
  const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
  const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
  const __m512i v01 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(2, 0, 2, 0));
  const __m512i v23 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(2, 0, 2, 0));
  const __m512i w01 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(3, 1, 3, 1));
  const __m512i w23 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(3, 1, 3, 1));
  _mm512_storeu_si512(words, _mm512_shuffle_i32x4(v01, v23, _MM_SHUFFLE(2, 0, 2, 0)));
  _mm512_storeu_si512(words + 16, _mm512_shuffle_i32x4(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)));
  _mm512_storeu_si512(words + 32, _mm512_shuffle_i32x4(v01, v23, _MM_SHUFFLE(3, 1, 3, 1)));
  _mm512_storeu_si512(words + 48, _mm512_shuffle_i32x4(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
}

}  // namespace

LORI_AVX512 void tile_words_avx512(const AGenParams& g, int64_t r0, int64_t b0, int64_t nb,
                                   int64_t n, uint32_t* words) {
  const __m512i c2 = _mm512_set1_epi32(g.dist), c3 = _mm512_setzero_si512();
  int64_t p = 0;
  if (n >= 16) {
    // Counters stepped in registers: 16 scalar stores re-read as one vector would stall on
    // store forwarding at every step.
    alignas(64) uint32_t blk[16], row[16];
    PairCursor(r0, b0, nb).next(16, blk, row);
    __m512i vb = _mm512_load_si512(blk), vr = _mm512_load_si512(row);
    const __m512i vnb = _mm512_set1_epi32(static_cast<int>(nb));
    const __m512i last = _mm512_set1_epi32(static_cast<int>(b0 + nb - 1));
    const __m512i step = _mm512_set1_epi32(16), one = _mm512_set1_epi32(1);
    for (; p + 16 <= n; p += 16) {
      philox16(g.k0, g.k1, vb, vr, c2, c3, words + 4 * p);
      vb = _mm512_add_epi32(vb, step);
      // Lanes past the last block wrap to the next row (more than once when nb < 16).
      for (__mmask16 m = _mm512_cmpgt_epi32_mask(vb, last); m != 0;
           m = _mm512_cmpgt_epi32_mask(vb, last)) {
        vb = _mm512_mask_sub_epi32(vb, m, vb, vnb);
        vr = _mm512_mask_add_epi32(vr, m, vr, one);
      }
    }
  }
  PairCursor cur(r0, b0, nb, p);
  tile_words_scalar(g, cur, n - p, words + 4 * p);
}

}  // namespace lori::cpu

// AVX-512 kernels of the B stage (h -> y): the prefill accumulate/store steps of apply_b_avx2
// 16 tokens wide, and the decode column-expand kernels (the AVX2 versions are in b_stage.h).
// GCC 12's AVX-512 headers build masked loads on _mm512_undefined_*(), which -Wuninitialized
// flags at every inlined use (a known false positive): silence it for this file only.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>

#include "avx512.h"
#include "lori/bitmask.h"
#include "simd512.h"

namespace lori::cpu {

namespace {

// a[0..15] -> one vector whose lane r is the sum of a[r]'s 16 lanes: a shuffle-add tree
// instead of 16 separate horizontal sums.
LORI_AVX512 inline __m512 reduce16(const __m512* a) {
  // Each level pairs vectors: a blend (ports 0/5) takes the halves that stay, one shuffle
  // (port 5) brings the halves that move, so 16 -> 1 costs 15 shuffles instead of 30 (port 5
  // is what the B stage runs out of). The tree leaves row r's sum in lane r.
  const __m512i mid = _mm512_setr_epi32(4, 5, 6, 7, 16, 17, 18, 19, 12, 13, 14, 15, 24, 25, 26, 27);
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i) {
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], _MM_SHUFFLE(1, 0, 3, 2)),
                         _mm512_mask_blend_ps(0xFF00, a[i], a[i + 8]));
  }
  for (int i = 0; i < 4; ++i) {
    u[i] = _mm512_add_ps(_mm512_permutex2var_ps(t[i], mid, t[i + 4]),
                         _mm512_mask_blend_ps(0xF0F0, t[i], t[i + 4]));
  }
  for (int i = 0; i < 2; ++i) {
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(1, 0, 3, 2)),
                         _mm512_mask_blend_ps(0xCCCC, u[i], u[i + 2]));
  }
  return _mm512_add_ps(
      _mm512_permute_ps(_mm512_mask_blend_ps(0x5555, w[0], w[1]), _MM_SHUFFLE(2, 3, 0, 1)),
      _mm512_mask_blend_ps(0xAAAA, w[0], w[1]));
}

// r[i] = row i (16 tokens) -> r[l] = token l (16 rows): 64 shuffles for 256 floats, a third
// fewer per element than two 8x8 transposes.
LORI_AVX512 inline void transpose16x16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
  }
  // u[4i + j], 128-bit lane q: rows 4i..4i+3 of token 4q + j.
  for (int j = 0; j < 4; ++j) {
    const __m512 a = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88);
    const __m512 b = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xdd);
    const __m512 c = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
    const __m512 d = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xdd);
    r[j] = _mm512_shuffle_f32x4(a, c, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(a, c, 0xdd);
    r[4 + j] = _mm512_shuffle_f32x4(b, d, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(b, d, 0xdd);
  }
}

template <int NV>
LORI_AVX512 inline void accumulate_rows_nv(const float* v, const int32_t* ks, const int32_t* st,
                                           int64_t nrows, const float* hT, int64_t Tp,
                                           int64_t tg, float* yT, int64_t ldy) {
  for (int64_t i = 0; i < nrows; ++i) {
    __m512 acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t e = st[i]; e < st[i + 1]; ++e) {
      const __m512 bv = _mm512_set1_ps(v[e]);
      const float* hk = hT + static_cast<int64_t>(ks[e]) * Tp + tg;
      for (int j = 0; j < NV; ++j) acc[j] = _mm512_fmadd_ps(bv, _mm512_loadu_ps(hk + 16 * j), acc[j]);
    }
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(yT + i * ldy + 16 * j, acc[j]);
  }
}

template <typename scalar_t>
LORI_AVX512 void store_chunk_impl(const float* yT, int64_t ldy, int64_t nrows, int64_t ng,
                                    int64_t ntok, const int64_t* tok, int64_t tg, scalar_t* y,
                                    int64_t out, int64_t row0, float scale, bool accumulate) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t tb = 0; tb < ng; tb += 16) {
    const int nt = static_cast<int>(std::min<int64_t>(16, ntok - tb));
    if (nt <= 0) break;
    for (int64_t i0 = 0; i0 < nrows; i0 += 16) {
      const int no = static_cast<int>(std::min<int64_t>(16, nrows - i0));
      __m512 blk[16];
      for (int i = 0; i < 16; ++i) {
        blk[i] = i < no ? _mm512_loadu_ps(yT + (i0 + i) * ldy + tb) : _mm512_setzero_ps();
      }
      transpose16x16(blk);
      for (int l = 0; l < nt; ++l) {
        const int64_t t = tok ? tok[tg + tb + l] : tg + tb + l;
        store_rows16(_mm512_mul_ps(blk[l], vscale), y + t * out + row0 + i0, no, accumulate);
      }
    }
  }
}

// Each 16 mask bits expand 16 packed values into a dense vector (vexpandps reads exactly
// popcount values: no read past the chunk), times h's matching 16 entries; 16 rows at a time
// reduce through reduce16.
template <typename scalar_t, int NT>
LORI_AVX512 int64_t expand_nt(const BView& b, int64_t rank, int64_t nnz, const float* h,
                              int64_t ldh, float scale, scalar_t* y, int64_t c0, int64_t c1,
                              const int64_t* tok, bool accumulate) {
  const uint32_t last_valid = last_word_valid_bits(static_cast<int>(rank));
  const __m512 vscale = _mm512_set1_ps(scale);
  int32_t starts[kRowChunk + 1];
  __m512 racc[NT][16];
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t row0 = c * kRowChunk, row1 = std::min(b.out, row0 + kRowChunk);
    const int64_t o0 = b.offsets[c], o1 = b.offsets[c + 1];
    if (o0 < 0 || o1 < o0 || o1 > nnz) return c;
    int64_t count = 0;  // validate the chunk (and find row starts) before reading values
    uint32_t stray = 0;
    for (int64_t r = row0; r < row1; ++r) {
      starts[r - row0] = static_cast<int32_t>(count);
      const uint32_t* w = b.mask + r * b.words;
      for (int64_t q = 0; q < b.words; ++q) count += __builtin_popcount(w[q]);
      stray |= w[b.words - 1] & ~last_valid;
    }
    if (stray != 0 || count != o1 - o0) return c;
    const float* vc = b.values + o0;
    for (int64_t i0 = row0; i0 < row1; i0 += 16) {
      const int no = static_cast<int>(std::min<int64_t>(16, row1 - i0));
      for (int i = 0; i < 16; ++i) {
        __m512 acc[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
        if (i < no) {
          const int64_t r = i0 + i;
          const uint32_t* w = b.mask + r * b.words;
          const float* v = vc + starts[r - row0];
          for (int64_t q = 0; q < b.words; ++q) {
            const __mmask16 k0 = static_cast<__mmask16>(w[q]);
            const __mmask16 k1 = static_cast<__mmask16>(w[q] >> 16);
            const __m512 d0 = _mm512_maskz_expandloadu_ps(k0, v);
            const __m512 d1 = _mm512_maskz_expandloadu_ps(k1, v + __builtin_popcount(k0));
            v += __builtin_popcount(w[q]);
            for (int t = 0; t < NT; ++t) {
              acc[t] = _mm512_fmadd_ps(d0, _mm512_loadu_ps(h + t * ldh + 32 * q), acc[t]);
              acc[t] = _mm512_fmadd_ps(d1, _mm512_loadu_ps(h + t * ldh + 32 * q + 16), acc[t]);
            }
          }
        }
        for (int t = 0; t < NT; ++t) racc[t][i] = acc[t];
      }
      for (int t = 0; t < NT; ++t) {
        const int64_t tt = tok ? tok[t] : t;
        store_rows16(_mm512_mul_ps(reduce16(racc[t]), vscale), y + tt * b.out + i0, no,
                     accumulate);
      }
    }
  }
  return -1;
}

// expand_nt for the decode hot path: one token, rank <= 32 (one mask word per row). The
// 16-row group is fully unrolled so the 16 accumulators and h stay in registers (the generic
// loop above spills them), and each row's value start comes from the validation pass, so no
// row waits on the previous row's popcount.
template <typename scalar_t>
LORI_AVX512 int64_t expand_1t_w1(const BView& b, int64_t rank, int64_t nnz, const float* h,
                                 float scale, scalar_t* y, int64_t c0, int64_t c1,
                                 bool accumulate) {
  const uint32_t invalid = ~last_word_valid_bits(static_cast<int>(rank));
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 h0 = _mm512_loadu_ps(h), h1 = _mm512_loadu_ps(h + 16);
  alignas(64) int32_t starts[kRowChunk];
  alignas(64) uint32_t words[kRowChunk];
  for (int64_t c = c0; c < c1; ++c) {
    // Rows past the end of B get an empty mask (their expand-loads read nothing).
    if (!chunk_rows_w1(b, c, invalid, nnz, starts, words)) return c;
    const int64_t row0 = c * kRowChunk, n = std::min<int64_t>(kRowChunk, b.out - row0);
    const float* vc = b.values + b.offsets[c];
    for (int64_t i0 = 0; i0 < n; i0 += 16) {
      __m512 acc[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) {
        // Mask halves loaded from memory straight into k registers: a kmov from a general
        // register would take port 5, which the expand-loads and reduce16 already saturate.
        // (GCC turns _load_mask16 into movzwl + kmovw, hence the asm.)
        const uint16_t* half = reinterpret_cast<const uint16_t*>(words + i0 + i);
        __mmask16 k0, k1;
        asm("kmovw %1, %0" : "=k"(k0) : "m"(half[0]));
        asm("kmovw %1, %0" : "=k"(k1) : "m"(half[1]));
        const float* v = vc + starts[i0 + i];
        const uint32_t m = words[i0 + i];
        const __m512 d0 = _mm512_maskz_expandloadu_ps(k0, v);
        const __m512 d1 = _mm512_maskz_expandloadu_ps(k1, v + __builtin_popcount(m & 0xffffu));
        acc[i] = _mm512_fmadd_ps(d1, h1, _mm512_mul_ps(d0, h0));
      }
      store_rows16(_mm512_mul_ps(reduce16(acc), vscale), y + row0 + i0,
                   static_cast<int>(std::min<int64_t>(16, n - i0)), accumulate);
    }
  }
  return -1;
}

}  // namespace

// Not target-attributed itself (a template declared in avx512.h): the AVX-512 body is
// store_chunk_impl.
template <typename scalar_t>
void store_chunk_avx512(const float* yT, int64_t ldy, int64_t nrows, int64_t ng, int64_t ntok,
                        const int64_t* tok, int64_t tg, scalar_t* y, int64_t out, int64_t row0,
                        float scale, bool accumulate) {
  store_chunk_impl(yT, ldy, nrows, ng, ntok, tok, tg, y, out, row0, scale, accumulate);
}

template void store_chunk_avx512<float>(const float*, int64_t, int64_t, int64_t, int64_t,
                                        const int64_t*, int64_t, float*, int64_t, int64_t, float,
                                        bool);
template void store_chunk_avx512<c10::BFloat16>(const float*, int64_t, int64_t, int64_t, int64_t,
                                                const int64_t*, int64_t, c10::BFloat16*, int64_t,
                                                int64_t, float, bool);
template void store_chunk_avx512<c10::Half>(const float*, int64_t, int64_t, int64_t, int64_t,
                                            const int64_t*, int64_t, c10::Half*, int64_t,
                                            int64_t, float, bool);

LORI_AVX512 void accumulate_rows_avx512(const float* v, const int32_t* ks, const int32_t* st,
                                        int64_t nrows, const float* hT, int64_t Tp, int64_t tg,
                                        int64_t ng, float* yT, int64_t ldy) {
  switch (ng / 16) {
    case 1: return accumulate_rows_nv<1>(v, ks, st, nrows, hT, Tp, tg, yT, ldy);
    case 2: return accumulate_rows_nv<2>(v, ks, st, nrows, hT, Tp, tg, yT, ldy);
    case 3: return accumulate_rows_nv<3>(v, ks, st, nrows, hT, Tp, tg, yT, ldy);
    default: return accumulate_rows_nv<4>(v, ks, st, nrows, hT, Tp, tg, yT, ldy);
  }
}

template <typename scalar_t>
int64_t apply_b_expand_avx512(int64_t T, const BView& b, int64_t rank, int64_t nnz,
                              const float* h, int64_t ldh, float scale, scalar_t* y, int64_t c0,
                              int64_t c1, const int64_t* tok, bool accumulate) {
  // h rows are zero-padded to a multiple of 32 (hrow), so rank <= 32 may load 32 lanes.
  if (T == 1 && b.words == 1) {
    return expand_1t_w1<scalar_t>(b, rank, nnz, h, scale, tok ? y + tok[0] * b.out : y, c0, c1,
                                  accumulate);
  }
  switch (T) {
    case 1: return expand_nt<scalar_t, 1>(b, rank, nnz, h, ldh, scale, y, c0, c1, tok, accumulate);
    case 2: return expand_nt<scalar_t, 2>(b, rank, nnz, h, ldh, scale, y, c0, c1, tok, accumulate);
    case 3: return expand_nt<scalar_t, 3>(b, rank, nnz, h, ldh, scale, y, c0, c1, tok, accumulate);
    default: return expand_nt<scalar_t, 4>(b, rank, nnz, h, ldh, scale, y, c0, c1, tok, accumulate);
  }
}

template int64_t apply_b_expand_avx512<float>(int64_t, const BView&, int64_t, int64_t,
                                              const float*, int64_t, float, float*, int64_t,
                                              int64_t, const int64_t*, bool);
template int64_t apply_b_expand_avx512<c10::BFloat16>(int64_t, const BView&, int64_t, int64_t,
                                                      const float*, int64_t, float,
                                                      c10::BFloat16*, int64_t, int64_t,
                                                      const int64_t*, bool);
template int64_t apply_b_expand_avx512<c10::Half>(int64_t, const BView&, int64_t, int64_t,
                                                  const float*, int64_t, float, c10::Half*,
                                                  int64_t, int64_t, const int64_t*, bool);


}  // namespace lori::cpu

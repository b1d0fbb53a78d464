// GCC 12's AVX-512 headers build masked loads on _mm512_undefined_*(), which -Wuninitialized
// flags at every inlined use (a known false positive): silence it for this file only.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "avx512.h"
#include "agen.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "lori/bitmask.h"
#include "lori/philox.h"
#include "simd.h"

#define LORI_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c,bmi2")))

namespace lori::cpu {

namespace {
std::atomic<int> g_isa_cap{2};

int detected_isa() {
  static const int isa = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("bmi2") && has_avx2()) {
      return 2;
    }
    return has_avx2() ? 1 : 0;
  }();
  return isa;
}
}  // namespace

int cpu_isa() { return std::min(detected_isa(), g_isa_cap.load(std::memory_order_relaxed)); }
bool use_avx512() { return cpu_isa() >= 2; }

std::string set_cpu_isa(c10::string_view isa) {
  const int before = cpu_isa();
  int cap;
  if (isa == "auto" || isa == "avx512") {
    cap = 2;
  } else if (isa == "avx2") {
    cap = 1;
  } else if (isa == "generic") {
    cap = 0;
  } else {
    TORCH_CHECK_VALUE(false, "_set_cpu_isa: isa must be auto, avx512, avx2 or generic, got '",
                      std::string(isa), "'");
  }
  g_isa_cap.store(cap);
  static const char* names[] = {"generic", "avx2", "avx512"};
  return names[before];
}

namespace {

// Horizontal sum (GCC 12's _mm512_reduce_add_ps trips -Wuninitialized in its own header).
LORI_AVX512 inline float hsum16(__m512 v) {
  return hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

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

namespace {

// Sign dot of NT tokens as sum(x) - 2 * (sum of x over A's negative entries): one masked add
// per 16 elements instead of a sign flip and an add (ports 0 and 5 are the limit; the sum of
// x is the caller's, once per token for all of A's rows). NT == 1: four accumulators, 64
// columns a step; NT == 4: two per token. Accumulator indices are compile-time constants (a
// run-time index sends them through the stack).
template <int NT>
LORI_AVX512 void sign_dot_group(const float* x, int64_t n, int64_t ldx, const uint32_t* signs,
                                float magnitude, const float* xsum, float* out) {
  constexpr int NA = NT == 1 ? 4 : 2;
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
        acc[0][a] = _mm512_mask_add_ps(acc[0][a], k, acc[0][a], _mm512_loadu_ps(x + j + 16 * a));
      }
    }
  }
  for (; j + 32 <= n; j += 32) {
    const uint32_t w = signs[j >> 5];
    const __mmask16 k0 = static_cast<__mmask16>(w), k1 = static_cast<__mmask16>(w >> 16);
    for (int t = 0; t < NT; ++t) {
      const float* xt = x + t * ldx + j;
      acc[t][0] = _mm512_mask_add_ps(acc[t][0], k0, acc[t][0], _mm512_loadu_ps(xt));
      acc[t][1] = _mm512_mask_add_ps(acc[t][1], k1, acc[t][1], _mm512_loadu_ps(xt + 16));
    }
  }
  if (j < n) {  // tail: only lanes below n
    const uint32_t w = signs[j >> 5];
    const int64_t rem = n - j;
    const __mmask16 l0 = static_cast<__mmask16>(rem >= 16 ? 0xffff : (1u << rem) - 1u);
    const __mmask16 l1 = static_cast<__mmask16>(rem <= 16 ? 0 : (1u << (rem - 16)) - 1u);
    const __mmask16 k0 = static_cast<__mmask16>(w) & l0, k1 = static_cast<__mmask16>(w >> 16) & l1;
    for (int t = 0; t < NT; ++t) {
      const float* xt = x + t * ldx + j;
      acc[t][0] = _mm512_mask_add_ps(acc[t][0], k0, acc[t][0], _mm512_maskz_loadu_ps(k0, xt));
      acc[t][1] = _mm512_mask_add_ps(acc[t][1], k1, acc[t][1], _mm512_maskz_loadu_ps(k1, xt + 16));
    }
  }
  for (int t = 0; t < NT; ++t) {
    __m512 s = acc[t][0];
    for (int a = 1; a < NA; ++a) s = _mm512_add_ps(s, acc[t][a]);
    out[t] = (xsum[t] - 2.f * hsum16(s)) * magnitude;
  }
}

}  // namespace

LORI_AVX512 void dot_rows_signs_avx512(const float* x, int64_t T, int64_t n, int64_t ldx,
                                       const uint32_t* signs, float magnitude,
                                       const float* xsum, float* out) {
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) {
    sign_dot_group<4>(x + t * ldx, n, ldx, signs, magnitude, xsum + t, out + t);
  }
  for (; t < T; ++t) sign_dot_group<1>(x + t * ldx, n, ldx, signs, magnitude, xsum + t, out + t);
}

LORI_AVX512 void row_sums_avx512(const float* x, int64_t T, int64_t n, int64_t ldx, float* out) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * ldx;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
      a0 = _mm512_add_ps(a0, _mm512_loadu_ps(xt + j));
      a1 = _mm512_add_ps(a1, _mm512_loadu_ps(xt + j + 16));
    }
    for (; j < n; j += 16) {
      const int64_t rem = n - j;
      const __mmask16 l = static_cast<__mmask16>(rem >= 16 ? 0xffff : (1u << rem) - 1u);
      a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(l, xt + j));
    }
    out[t] = hsum16(_mm512_add_ps(a0, a1));
  }
}

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

// Rows d[0, n) (n <= 16) of one token's output = lanes of v (+ d's old values when
// accumulating), converted to scalar_t once.
template <typename scalar_t>
LORI_AVX512 inline void store_rows16(__m512 v, scalar_t* d, int n, bool accumulate) {
  store_out(d, _mm512_castps512_ps256(v), std::min(8, n), accumulate);
  if (n > 8) store_out(d + 8, _mm512_extractf32x8_ps(v, 1), n - 8, accumulate);
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

// Chunk c of a B with one mask word per row (rank <= 32): starts[r] = row r's first value
// within the chunk, words[r] = its mask, rows past B's end padded with empty masks up to 64.
// Validates the chunk against offsets before any value is read: returns false (read nothing)
// when offsets or bits >= rank contradict the mask.
LORI_AVX512 inline bool chunk_rows_w1(const BView& b, int64_t c, uint32_t invalid, int64_t nnz,
                                      int32_t* starts, uint32_t* words) {
  const int64_t row0 = c * kRowChunk, n = std::min<int64_t>(kRowChunk, b.out - row0);
  const int64_t o0 = b.offsets[c], o1 = b.offsets[c + 1];
  if (o0 < 0 || o1 < o0 || o1 > nnz) return false;
  const uint32_t* w = b.mask + row0;
  int32_t count = 0;
  uint32_t stray = 0;
  for (int64_t r = 0; r < n; ++r) {
    starts[r] = count;
    words[r] = w[r];
    count += __builtin_popcount(w[r]);
    stray |= w[r];
  }
  if (n < kRowChunk) {
    for (int64_t r = n; r < kRowChunk; ++r) {
      starts[r] = count;
      words[r] = 0;
    }
  }
  return (stray & invalid) == 0 && count == o1 - o0;
}

template <typename scalar_t, int NT>
LORI_AVX512 int64_t gy_decode_nt(const BView& b, int64_t rank, int64_t nnz, const scalar_t* gy,
                                 const float* h, float* gh, float* gv, float scale, int64_t c0,
                                 int64_t c1) {
  const uint32_t invalid = ~last_word_valid_bits(static_cast<int>(rank));
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 acc0[NT], acc1[NT], h0[NT], h1[NT];
  for (int t = 0; t < NT; ++t) {
    acc0[t] = acc1[t] = _mm512_setzero_ps();
    h0[t] = h ? _mm512_loadu_ps(h + 32 * t) : _mm512_setzero_ps();
    h1[t] = h ? _mm512_loadu_ps(h + 32 * t + 16) : _mm512_setzero_ps();
  }
  alignas(64) int32_t starts[kRowChunk];
  alignas(64) uint32_t w[kRowChunk];
  for (int64_t c = c0; c < c1; ++c) {
    if (!chunk_rows_w1(b, c, invalid, nnz, starts, w)) return c;
    const int64_t row0 = c * kRowChunk, n = std::min<int64_t>(kRowChunk, b.out - row0);
    const float* vc = b.values + b.offsets[c];
    float* gvc = gv ? gv + b.offsets[c] : nullptr;
    for (int64_t r = 0; r < n; ++r) {
      const uint32_t m = w[r];
      const __mmask16 k0 = static_cast<__mmask16>(m), k1 = static_cast<__mmask16>(m >> 16);
      const int n0 = __builtin_popcount(m & 0xffffu), n1 = __builtin_popcount(m >> 16);
      __m512 g[NT];
      for (int t = 0; t < NT; ++t) g[t] = _mm512_set1_ps(static_cast<float>(gy[t * b.out + row0 + r]));
      if (gh) {  // gh[t] += gy[t, o] * (B's row o, expanded to rank lanes)
        const __m512 d0 = _mm512_maskz_expandloadu_ps(k0, vc + starts[r]);
        const __m512 d1 = _mm512_maskz_expandloadu_ps(k1, vc + starts[r] + n0);
        for (int t = 0; t < NT; ++t) {
          acc0[t] = _mm512_fmadd_ps(g[t], d0, acc0[t]);
          acc1[t] = _mm512_fmadd_ps(g[t], d1, acc1[t]);
        }
      }
      if (gvc) {  // the row's pattern lanes of scale * sum_t gy[t, o] h[t], packed in place
        __m512 p0 = _mm512_mul_ps(g[0], h0[0]), p1 = _mm512_mul_ps(g[0], h1[0]);
        for (int t = 1; t < NT; ++t) {
          p0 = _mm512_fmadd_ps(g[t], h0[t], p0);
          p1 = _mm512_fmadd_ps(g[t], h1[t], p1);
        }
        float* dst = gvc + starts[r];
        _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << n0) - 1u),
                              _mm512_maskz_compress_ps(k0, _mm512_mul_ps(p0, vscale)));
        _mm512_mask_storeu_ps(dst + n0, static_cast<__mmask16>((1u << n1) - 1u),
                              _mm512_maskz_compress_ps(k1, _mm512_mul_ps(p1, vscale)));
      }
    }
  }
  if (gh) {
    for (int t = 0; t < NT; ++t) {
      _mm512_storeu_ps(gh + 32 * t, _mm512_add_ps(_mm512_loadu_ps(gh + 32 * t), acc0[t]));
      _mm512_storeu_ps(gh + 32 * t + 16, _mm512_add_ps(_mm512_loadu_ps(gh + 32 * t + 16), acc1[t]));
    }
  }
  return -1;
}

template <typename scalar_t>
LORI_AVX512 void grad_x_signs_impl(const float* gh, int64_t T, int64_t rank, const AGenParams& g,
                                   int64_t c0, int64_t c1, scalar_t* gx, int64_t ldgx) {
  // sum_r gh[r] * (+-m) = m * (sum_r gh[r] - 2 * sum over the negative r): one masked
  // subtract per rank row and 16 columns.
  const int64_t b0 = c0 >> 7, nb = ((c1 - 1) >> 7) + 1 - b0, nw = 4 * nb;
  thread_local std::vector<uint32_t> words;
  if (words.size() < static_cast<size_t>(rank * nw)) words.resize(static_cast<size_t>(rank * nw));
  gen_a_words(g, 0, rank, b0, nb, words.data());
  float total[kDirectMaxTokens];
  for (int64_t t = 0; t < T; ++t) {
    float sum = 0.f;
    for (int64_t r = 0; r < rank; ++r) sum += gh[t * rank + r];
    total[t] = sum;
  }
  const __m512 mag = _mm512_set1_ps(g.magnitude);
  for (int64_t c = c0; c < c1; c += 16) {
    const int64_t e = c - (b0 << 7);  // element of the rows' word streams, a multiple of 16
    const int n = static_cast<int>(std::min<int64_t>(16, c1 - c));
    for (int64_t t = 0; t < T; ++t) {
      const float* ght = gh + t * rank;
      __m512 acc = _mm512_set1_ps(total[t]);
      for (int64_t r = 0; r < rank; ++r) {
        const __mmask16 k = static_cast<__mmask16>(words[r * nw + (e >> 5)] >> (e & 31));
        acc = _mm512_mask_sub_ps(acc, k, acc, _mm512_set1_ps(2.f * ght[r]));
      }
      store_rows16(_mm512_mul_ps(acc, mag), gx + t * ldgx + c, n, false);
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

template <typename scalar_t>
int64_t gy_pass_decode_avx512(int64_t T, const BView& b, int64_t rank, int64_t nnz,
                              const scalar_t* gy, const float* h, float* gh, float* gv,
                              float scale, int64_t c0, int64_t c1) {
  switch (T) {
    case 1: return gy_decode_nt<scalar_t, 1>(b, rank, nnz, gy, h, gh, gv, scale, c0, c1);
    case 2: return gy_decode_nt<scalar_t, 2>(b, rank, nnz, gy, h, gh, gv, scale, c0, c1);
    case 3: return gy_decode_nt<scalar_t, 3>(b, rank, nnz, gy, h, gh, gv, scale, c0, c1);
    default: return gy_decode_nt<scalar_t, 4>(b, rank, nnz, gy, h, gh, gv, scale, c0, c1);
  }
}

template <typename scalar_t>
void grad_x_signs_avx512(const float* gh, int64_t T, int64_t rank, const AGenParams& g,
                         int64_t c0, int64_t c1, scalar_t* gx, int64_t ldgx) {
  grad_x_signs_impl(gh, T, rank, g, c0, c1, gx, ldgx);
}

#define LORI_INSTANTIATE_DECODE_BWD(T_)                                                      \
  template int64_t gy_pass_decode_avx512<T_>(int64_t, const BView&, int64_t, int64_t,         \
                                             const T_*, const float*, float*, float*, float,  \
                                             int64_t, int64_t);                               \
  template void grad_x_signs_avx512<T_>(const float*, int64_t, int64_t, const AGenParams&,    \
                                        int64_t, int64_t, T_*, int64_t);
LORI_INSTANTIATE_DECODE_BWD(float)
LORI_INSTANTIATE_DECODE_BWD(c10::BFloat16)
LORI_INSTANTIATE_DECODE_BWD(c10::Half)
#undef LORI_INSTANTIATE_DECODE_BWD

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


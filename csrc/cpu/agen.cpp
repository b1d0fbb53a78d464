// A-tile generation and the CPU kernels of _random_a_fill and philox4x32_10.
#include "agen.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "lori/philox.h"
#include "avx512.h"
#include "isa.h"
#include "simd.h"

namespace lori::cpu {

void tile_words_scalar(const AGenParams& g, PairCursor& cur, int64_t n, uint32_t* words) {
  for (int64_t p = 0; p < n; ++p) {
    uint32_t blk, row;
    cur.next(1, &blk, &row);
    const U32x4 o = a_block(g.k0, g.k1, g.dist, blk, row);
    std::memcpy(words + 4 * p, o.v, sizeof(o.v));
  }
}

namespace {

// ---- Philox on 8 counters at once --------------------------------------------------------
LORI_AVX2 inline void mulhilo8(__m256i m, __m256i c, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(c, m);                         // lanes 0,2,4,6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);  // lanes 1,3,5,7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// words[8 * 4]: the 4 output words of each of the 8 counters, counter-major.
LORI_AVX2 void philox8(uint32_t k0s, uint32_t k1s, __m256i c0, __m256i c1, __m256i c2,
                       __m256i c3, uint32_t* words) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  uint32_t k0 = k0s, k1 = k1s;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(m0, c0, hi0, lo0);
    mulhilo8(m1, c2, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
  }
  // 4 x 8 (word-major) -> 8 x 4 (counter-major).
  const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
  const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  auto* out = reinterpret_cast<__m256i*>(words);
  _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
  _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
  _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
  _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
}

// Philox blocks for pairs p in [0, n): row r0 + p / nb, block b0 + p % nb; words[4p + w].
LORI_AVX2 void tile_words_avx2(const AGenParams& g, int64_t r0, int64_t b0, int64_t nb,
                               int64_t n, uint32_t* words) {
  const __m256i c2 = _mm256_set1_epi32(g.dist), c3 = _mm256_setzero_si256();
  int64_t p = 0;
  if (n >= 8) {
    // Counters stepped in registers (see tile_words_avx512).
    alignas(32) uint32_t blk[8], row[8];
    PairCursor(r0, b0, nb).next(8, blk, row);
    __m256i vb = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk));
    __m256i vr = _mm256_load_si256(reinterpret_cast<const __m256i*>(row));
    const __m256i vnb = _mm256_set1_epi32(static_cast<int>(nb));
    const __m256i last = _mm256_set1_epi32(static_cast<int>(b0 + nb - 1));
    const __m256i step = _mm256_set1_epi32(8);
    for (; p + 8 <= n; p += 8) {
      philox8(g.k0, g.k1, vb, vr, c2, c3, words + 4 * p);
      vb = _mm256_add_epi32(vb, step);
      for (__m256i m = _mm256_cmpgt_epi32(vb, last); !_mm256_testz_si256(m, m);
           m = _mm256_cmpgt_epi32(vb, last)) {
        vb = _mm256_sub_epi32(vb, _mm256_and_si256(m, vnb));
        vr = _mm256_sub_epi32(vr, m);  // m is -1 in wrapped lanes
      }
    }
  }
  PairCursor cur(r0, b0, nb, p);
  tile_words_scalar(g, cur, n - p, words + 4 * p);
}


// ---- words -> fp32 elements ---------------------------------------------------------------
// Element e of a row's word stream: uniform -> word e; Rademacher -> bit e%32 of word e/32.
inline float elem_scalar(int dist, float mag, const uint32_t* words, int64_t e) {
  if (dist == kRademacher) return ((words[e >> 5] >> (e & 31)) & 1u) ? -mag : mag;
  return uniform_unit(words[e]) * mag;
}

LORI_AVX2 void words_to_floats_avx2(int dist, float mag, const uint32_t* words, int64_t e0,
                                    int64_t n, float* out) {
  int64_t i = 0;
  if (dist == kUniform) {
    // unit * mag == float(2k + 1 - 2^23) * (2^-23 * mag) exactly: scaling by 2^-23 is exact.
    const __m256 scale = _mm256_set1_ps(mag * 1.1920928955078125e-07f);
    const __m256i one = _mm256_set1_epi32(1), off = _mm256_set1_epi32(1 << 23);
    for (; i + 8 <= n; i += 8) {
      const __m256i w =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + e0 + i));
      const __m256i odd = _mm256_sub_epi32(_mm256_or_si256(_mm256_srli_epi32(w, 8), one), off);
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtepi32_ps(odd), scale));
    }
  } else {
    for (; i < n && ((e0 + i) & 7); ++i) out[i] = elem_scalar(dist, mag, words, e0 + i);
    const __m256i base = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
    const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    const __m256i magbits = _mm256_castps_si256(_mm256_set1_ps(mag));
    for (; i + 8 <= n; i += 8) {
      const int64_t e = e0 + i;
      const __m256i w = _mm256_set1_epi32(static_cast<int>(words[e >> 5]));
      const __m256i sh = _mm256_sub_epi32(base, _mm256_set1_epi32(static_cast<int>(e & 31)));
      const __m256i s = _mm256_and_si256(_mm256_sllv_epi32(w, sh), sign);
      _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_or_si256(s, magbits)));
    }
  }
  for (; i < n; ++i) out[i] = elem_scalar(dist, mag, words, e0 + i);
}

}  // namespace

void gen_a_words(const AGenParams& g, int64_t r0, int64_t r1, int64_t b0, int64_t nb,
                 uint32_t* words) {
  const Isa isa = cpu_paths().philox;
  if (isa == Isa::kAvx512) {
    tile_words_avx512(g, r0, b0, nb, (r1 - r0) * nb, words);
  } else if (isa == Isa::kAvx2) {
    tile_words_avx2(g, r0, b0, nb, (r1 - r0) * nb, words);
  } else {
    PairCursor cur(r0, b0, nb);
    tile_words_scalar(g, cur, (r1 - r0) * nb, words);
  }
}

void gen_a_signs(const AGenParams& g, int64_t r, int64_t c0, int64_t n, uint32_t* words) {
  if (n <= 0) return;
  const int64_t a0 = g.col0 + c0;  // A's column of bit 0
  const int64_t b0 = a0 >> 7, nb = ((a0 + n - 1) >> 7) + 1 - b0;
  const int64_t shift = a0 & 127, nw = (n + 31) >> 5;
  if (shift == 0) {  // on a block edge: the stream as generated
    thread_local std::vector<uint32_t> full;
    full.resize(static_cast<size_t>(4 * nb));
    gen_a_words(g, r, r + 1, b0, nb, full.data());
    std::memcpy(words, full.data(), static_cast<size_t>(nw) * sizeof(uint32_t));
    return;
  }
  thread_local std::vector<uint32_t> full;
  full.resize(static_cast<size_t>(4 * nb) + 1);
  gen_a_words(g, r, r + 1, b0, nb, full.data());
  full[static_cast<size_t>(4 * nb)] = 0;
  const int64_t q = shift >> 5;
  const int s = static_cast<int>(shift & 31);
  for (int64_t i = 0; i < nw; ++i) {
    const uint32_t lo = full[static_cast<size_t>(q + i)];
    const uint32_t hi = q + i + 1 < 4 * nb + 1 ? full[static_cast<size_t>(q + i + 1)] : 0u;
    words[i] = s == 0 ? lo : (lo >> s) | (hi << (32 - s));
  }
}

void gen_a_tile(const AGenParams& g, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* out,
                int64_t ld) {
  if (r1 <= r0 || c1 <= c0) return;
  c0 += g.col0;  // the window's columns -> A's
  c1 += g.col0;
  const int sh = elems_per_block_log2(g.dist);
  const int64_t b0 = c0 >> sh, nb = ((c1 - 1) >> sh) + 1 - b0, nr = r1 - r0;
  thread_local std::vector<uint32_t> words;
  words.resize(static_cast<size_t>(nr * nb * 4) + 8);
  gen_a_words(g, r0, r1, b0, nb, words.data());
  const bool avx2 = cpu_paths().a_floats >= Isa::kAvx2;
  const int64_t e0 = c0 - (b0 << sh);
  for (int64_t r = 0; r < nr; ++r) {
    const uint32_t* w = words.data() + r * nb * 4;
    float* o = out + r * ld;
    if (avx2) {
      words_to_floats_avx2(g.dist, g.magnitude, w, e0, c1 - c0, o);
    } else {
      for (int64_t i = 0; i < c1 - c0; ++i) o[i] = elem_scalar(g.dist, g.magnitude, w, e0 + i);
    }
  }
}

namespace {

void random_a_fill_cpu(const at::Tensor& out, int64_t seed, int64_t in_features,
                       int64_t col_start, c10::string_view distribution) {
  TORCH_CHECK(out.device().is_cpu(), "_random_a_fill: out must be a CPU tensor");
  TORCH_CHECK_VALUE(out.dim() == 2, "_random_a_fill: out must be 2-D (rank, columns)");
  // A is computed in fp32 and copied into out: an integer out would silently truncate it.
  const auto t = out.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
                   "_random_a_fill: out must be float32, float64, bfloat16 or float16, got ", t);
  const AGenParams g = make_agen(seed, in_features, distribution);
  const int64_t rank = out.size(0), ncols = out.size(1);
  TORCH_CHECK_VALUE(col_start >= 0 && col_start <= in_features - ncols,
                    "_random_a_fill: columns [", col_start, ", ", col_start + ncols,
                    ") exceed in_features=", in_features);
  if (out.numel() == 0) return;
  const bool direct = out.scalar_type() == at::kFloat && out.is_contiguous();
  at::Tensor buf = direct ? out : at::empty({rank, ncols}, out.options().dtype(at::kFloat));
  float* p = buf.data_ptr<float>();
  at::parallel_for(0, rank, 1, [&](int64_t r0, int64_t r1) {
    gen_a_tile(g, r0, r1, col_start, col_start + ncols, p + r0 * ncols, ncols);
  });
  if (!direct) out.copy_(buf);
}

at::Tensor philox_cpu(const at::Tensor& counters, int64_t seed) {
  TORCH_CHECK_TYPE(counters.scalar_type() == at::kInt, "philox4x32_10: counters must be int32");
  TORCH_CHECK_VALUE(counters.dim() == 2 && counters.size(1) == 4,
                    "philox4x32_10: counters must have shape (N, 4), got ", counters.sizes());
  const at::Tensor c = counters.contiguous();
  at::Tensor out = at::empty_like(c);
  const auto* in = reinterpret_cast<const uint32_t*>(c.data_ptr<int32_t>());
  auto* o = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const uint64_t s = static_cast<uint64_t>(seed);
  for (int64_t i = 0; i < c.size(0); ++i) {
    const U32x4 r = philox4x32_10({{in[4 * i], in[4 * i + 1], in[4 * i + 2], in[4 * i + 3]}},
                                  static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
    std::memcpy(o + 4 * i, r.v, sizeof(r.v));
  }
  return out;
}

}  // namespace
}  // namespace lori::cpu

TORCH_LIBRARY_IMPL(lori, CPU, m) {
  m.impl("_random_a_fill", &lori::cpu::random_a_fill_cpu);
  m.impl("philox4x32_10", &lori::cpu::philox_cpu);
}

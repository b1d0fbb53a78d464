// AVX-512 kernels of the CPU backward's decode path (T <= 4 tokens, rank <= 32): one walk
// over B for gh and grad_values, and Rademacher grad_x from A's sign bits (the AVX2 backward
// is in sparse_delta_bwd.cpp).
// GCC 12's AVX-512 headers build masked loads on _mm512_undefined_*(), which -Wuninitialized
// flags at every inlined use (a known false positive): silence it for this file only.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <vector>

#include "agen.h"
#include "avx512.h"
#include "lori/bitmask.h"
#include "simd512.h"

namespace lori::cpu {

namespace {

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
  // sum_r gh[r] * (+-m) = m * sum_r (+-gh[r]): a masked sign flip and an add per rank row and
  // 16 columns. Every term is exact, so inf/NaN and near-overflow gh give what the AVX2 and
  // generic paths give (a sum of gh less twice its negative part would not).
  // Each row's sign stream starts at window column c0: on a Philox block edge the blocks of
  // all rows are generated at once (vectorized over rows); a window starting mid-block gets
  // each row's stream shifted by gen_a_signs.
  const int64_t a0 = g.col0 + c0;
  const bool aligned = (a0 & 127) == 0;
  const int64_t nb = ((a0 + (c1 - c0) - 1) >> 7) + 1 - (a0 >> 7);
  const int64_t nw = aligned ? 4 * nb : ((c1 - c0 + 31) >> 5) + 1;
  thread_local std::vector<uint32_t> words;
  if (words.size() < static_cast<size_t>(rank * nw)) words.resize(static_cast<size_t>(rank * nw));
  if (aligned) {
    gen_a_words(g, 0, rank, a0 >> 7, nb, words.data());
  } else {
    for (int64_t r = 0; r < rank; ++r) gen_a_signs(g, r, c0, c1 - c0, words.data() + r * nw);
  }
  const __m512 mag = _mm512_set1_ps(g.magnitude);
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
  for (int64_t c = c0; c < c1; c += 16) {
    const int64_t e = c - c0;  // element of the rows' sign streams, a multiple of 16
    const int n = static_cast<int>(std::min<int64_t>(16, c1 - c));
    for (int64_t t = 0; t < T; ++t) {
      const float* ght = gh + t * rank;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t r = 0; r < rank; ++r) {
        const __mmask16 k = static_cast<__mmask16>(words[r * nw + (e >> 5)] >> (e & 31));
        const __m512 gr = _mm512_set1_ps(ght[r]);
        acc = _mm512_add_ps(acc, _mm512_mask_xor_ps(gr, k, gr, sign));
      }
      store_rows16(_mm512_mul_ps(acc, mag), gx + t * ldgx + c, n, false);
    }
  }
}
}  // namespace

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

}  // namespace lori::cpu

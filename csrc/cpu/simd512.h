// AVX-512 helpers shared by the per-pass AVX-512 kernel files (*_avx512.cpp). Like simd.h,
// functions carry a target attribute instead of whole files compiling with -mavx512f, so the
// .so loads on any x86-64 CPU; isa.h decides at runtime whether they run.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "delta_common.h"
#include "lori/bitmask.h"
#include "simd.h"

#define LORI_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c,bmi2")))

namespace lori::cpu {

// Horizontal sum (GCC 12's _mm512_reduce_add_ps trips -Wuninitialized in its own header).
LORI_AVX512 inline float hsum16(__m512 v) {
  return hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

// Rows d[0, n) (n <= 16) of one token's output = lanes of v (+ d's old values when
// accumulating), converted to scalar_t once.
template <typename scalar_t>
LORI_AVX512 inline void store_rows16(__m512 v, scalar_t* d, int n, bool accumulate) {
  store_out(d, _mm512_castps512_ps256(v), std::min(8, n), accumulate);
  if (n > 8) store_out(d + 8, _mm512_extractf32x8_ps(v, 1), n - 8, accumulate);
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

}  // namespace lori::cpu

// The B stage of the CPU forward (y = scale * h @ B^T, B in bitmask form), shared by
// sparse_delta and batched_sparse_delta. Two kernels:
//  - apply_b_avx2: vectorized over tokens (prefill, T > 4): each row of B accumulates its
//    entries' v * hT[k, 64 tokens] in registers, then 8x8 transposes write y.
//  - apply_b_expand_avx2: vectorized over B's columns (decode, T <= 4): each byte of a mask
//    row expands 8 packed values into a dense 8-lane vector (maskload + permute, no
//    data-dependent branches), times h's matching 8 entries; 8 rows reduce with an hadd tree.
// Both validate each chunk against offsets before reading its values, and return the first
// bad chunk (or -1). Output token t goes to row tok[t] of y (tok == nullptr: row t), and is
// added to what y holds when `accumulate` (one rounding of y + delta in y's dtype).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "avx512.h"
#include "delta_common.h"
#include "isa.h"
#include "lori/bitmask.h"
#include "simd.h"

namespace lori::cpu {

// Prefill path (T > kExpandMaxTokens). Per chunk, per group of 64 tokens: each row of B accumulates its
// entries' v * hT[k, tokens] in 8 registers (64 tokens), the rows land in yT (64 x 64), and
// 8x8 transposes write y. The per-row entry loop is the only data-dependent branch, taken
// once per row per 64 tokens. Returns the first chunk that failed validation, or -1.
inline constexpr int64_t kYGroup = 64;

template <int NV>
LORI_AVX2 inline void row_accumulate(const float* v, const int32_t* ks, int64_t e0, int64_t e1,
                                     const float* hT, int64_t Tp, int64_t tg, float* dst) {
  __m256 acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t e = e0; e < e1; ++e) {
    const __m256 bv = _mm256_set1_ps(v[e]);
    const float* hk = hT + static_cast<int64_t>(ks[e]) * Tp + tg;
    for (int j = 0; j < NV; ++j) acc[j] = _mm256_fmadd_ps(bv, _mm256_loadu_ps(hk + 8 * j), acc[j]);
  }
  for (int j = 0; j < NV; ++j) _mm256_storeu_ps(dst + 8 * j, acc[j]);
}

template <typename scalar_t>
LORI_AVX2 int64_t apply_b_avx2(const BView& b, int64_t rank, int64_t nnz, const float* hT,
                               int64_t T, int64_t Tp, float scale, scalar_t* y, int64_t c0,
                               int64_t c1, const int64_t* tok = nullptr,
                               bool accumulate = false) {
  // Walk every chunk's mask once (validating it), keeping its entry columns; then go token
  // group by token group, so a group's slice of hT stays in L1 and its rows of y are written
  // together.
  const int64_t cap = kRowChunk * b.words * 32 + 8;
  thread_local std::vector<int32_t> ks, rows, starts;
  const int64_t nch = c1 - c0;
  if (nch <= 0) return -1;
  const int64_t e_base = b.offsets[c0];
  for (int64_t c = c0; c < c1; ++c) {  // offsets are checked per chunk before use below
    if (b.offsets[c] < 0 || b.offsets[c + 1] < b.offsets[c] || b.offsets[c + 1] > nnz) return c;
  }
  const int64_t total = b.offsets[c1] - e_base;
  if (static_cast<int64_t>(ks.size()) < total + cap) ks.resize(static_cast<size_t>(total + cap));
  if (static_cast<int64_t>(rows.size()) < cap) rows.resize(static_cast<size_t>(cap));
  if (static_cast<int64_t>(starts.size()) < nch * (kRowChunk + 1)) {
    starts.resize(static_cast<size_t>(nch * (kRowChunk + 1)));
  }
  for (int64_t c = c0; c < c1; ++c) {
    int32_t* kc = ks.data() + (b.offsets[c] - e_base);
    const int64_t n = extract_chunk(b, c, rank, nnz, kc, rows.data());
    if (n < 0) return c;
    const int64_t row0 = c * kRowChunk, nrows = std::min(b.out, row0 + kRowChunk) - row0;
    int32_t* st = starts.data() + (c - c0) * (kRowChunk + 1);
    for (int64_t i = 0, p = 0; i <= nrows; ++i) {  // row starts within the chunk's entries
      st[i] = static_cast<int32_t>(p);
      if (i < nrows) {
        for (int64_t q = 0; q < b.words; ++q) p += __builtin_popcount(b.mask[(row0 + i) * b.words + q]);
      }
    }
  }
  alignas(64) float yT[kRowChunk * kYGroup];
  const __m256 vscale = _mm256_set1_ps(scale);
  const bool avx512 = cpu_paths().b_prefill == Isa::kAvx512;
  for (int64_t tg = 0; tg < Tp; tg += kYGroup) {
    const int64_t ng = std::min(kYGroup, Tp - tg);  // multiple of 8
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t row0 = c * kRowChunk, nrows = std::min(b.out, row0 + kRowChunk) - row0;
      const int32_t* st = starts.data() + (c - c0) * (kRowChunk + 1);
      const int32_t* kc = ks.data() + (b.offsets[c] - e_base);
      const float* v = b.values + b.offsets[c];
      if (avx512 && ng % 16 == 0) {
        accumulate_rows_avx512(v, kc, st, nrows, hT, Tp, tg, ng, yT, kYGroup);
      } else {
        for (int64_t i = 0; i < nrows; ++i) {
          float* dst = yT + i * kYGroup;
          // Register accumulators for every group width (T = 16 is a common batch).
          switch (ng / 8) {
            case 1: row_accumulate<1>(v, kc, st[i], st[i + 1], hT, Tp, tg, dst); break;
            case 2: row_accumulate<2>(v, kc, st[i], st[i + 1], hT, Tp, tg, dst); break;
            case 3: row_accumulate<3>(v, kc, st[i], st[i + 1], hT, Tp, tg, dst); break;
            case 4: row_accumulate<4>(v, kc, st[i], st[i + 1], hT, Tp, tg, dst); break;
            case 5: row_accumulate<5>(v, kc, st[i], st[i + 1], hT, Tp, tg, dst); break;
            case 6: row_accumulate<6>(v, kc, st[i], st[i + 1], hT, Tp, tg, dst); break;
            case 7: row_accumulate<7>(v, kc, st[i], st[i + 1], hT, Tp, tg, dst); break;
            default: row_accumulate<8>(v, kc, st[i], st[i + 1], hT, Tp, tg, dst); break;
          }
        }
      }
      if (avx512 && ng % 16 == 0) {
        store_chunk_avx512<scalar_t>(yT, kYGroup, nrows, ng, T - tg, tok, tg, y, b.out, row0,
                                     scale, accumulate);
        continue;
      }
      for (int64_t tb = 0; tb < ng; tb += 8) {
        const int nt = static_cast<int>(std::min<int64_t>(8, T - tg - tb));
        if (nt <= 0) break;
        for (int64_t i0 = 0; i0 < nrows; i0 += 8) {
          const int no = static_cast<int>(std::min<int64_t>(8, nrows - i0));
          __m256 blk[8];
          for (int i = 0; i < 8; ++i) {
            blk[i] = i < no ? _mm256_loadu_ps(yT + (i0 + i) * kYGroup + tb) : _mm256_setzero_ps();
          }
          transpose8x8(blk);
          if (nt == 8) {
            // Constant trip count: blk stays in registers (a runtime bound spills it).
#pragma GCC unroll 8
            for (int l = 0; l < 8; ++l) {
              const int64_t t = tok ? tok[tg + tb + l] : tg + tb + l;
              store_out(y + t * b.out + row0 + i0, _mm256_mul_ps(blk[l], vscale), no, accumulate);
            }
          } else {
            for (int l = 0; l < nt; ++l) {
              const int64_t t = tok ? tok[tg + tb + l] : tg + tb + l;
              store_out(y + t * b.out + row0 + i0, _mm256_mul_ps(blk[l], vscale), no, accumulate);
            }
          }
        }
      }
    }
  }
  return -1;
}

struct ExpandTables {
  alignas(32) int32_t perm[256][8];  // lane l <- packed index popcount(byte & ((1 << l) - 1))
  alignas(32) int32_t lane[256][8];  // lane l set iff bit l of byte
  alignas(32) int32_t prefix[9][8];  // first n lanes set (maskload of n packed values)
  ExpandTables() {
    for (int b = 0; b < 256; ++b) {
      for (int l = 0; l < 8; ++l) {
        perm[b][l] = __builtin_popcount(b & ((1 << l) - 1)) & 7;
        lane[b][l] = (b >> l) & 1 ? -1 : 0;
      }
    }
    for (int n = 0; n <= 8; ++n) {
      for (int l = 0; l < 8; ++l) prefix[n][l] = l < n ? -1 : 0;
    }
  }
};
inline const ExpandTables kExpand;

LORI_AVX2 inline __m256 reduce8(const __m256 a[8]) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// NT <= 4 tokens; h is (NT, words * 32) fp32 rows with leading dimension ldh, zero past rank.
// `readable`: values readable from b.values (>= nnz; default nnz). Chunks ending >= 8 values
// before it read 8 values per byte with a plain load (lanes past the byte's entries are
// zeroed by the lane mask), the others with a masked load.
template <typename scalar_t, int NT>
LORI_AVX2 int64_t apply_b_expand_avx2(const BView& b, int64_t rank, int64_t nnz, const float* h,
                                      int64_t ldh, float scale, scalar_t* y, int64_t c0,
                                      int64_t c1, const int64_t* tok = nullptr,
                                      bool accumulate = false, int64_t readable = -1) {
  if (readable < nnz) readable = nnz;
  const uint32_t last_valid = last_word_valid_bits(static_cast<int>(rank));
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t row0 = c * kRowChunk, row1 = std::min(b.out, row0 + kRowChunk);
    const int64_t o0 = b.offsets[c], o1 = b.offsets[c + 1];
    if (o0 < 0 || o1 < o0 || o1 > nnz) return c;
    // Validate the chunk before reading any of its values.
    int64_t count = 0;
    uint32_t stray = 0;
    for (int64_t r = row0; r < row1; ++r) {
      const uint32_t* w = b.mask + r * b.words;
      for (int64_t q = 0; q < b.words; ++q) count += __builtin_popcount(w[q]);
      stray |= w[b.words - 1] & ~last_valid;
    }
    if (stray != 0 || count != o1 - o0) return c;
    const float* v = b.values + o0;
    const bool plain = o1 + 8 <= readable;
    for (int64_t i0 = row0; i0 < row1; i0 += 8) {
      __m256 acc[NT][8];
      const int no = static_cast<int>(std::min<int64_t>(8, row1 - i0));
      for (int i = 0; i < 8; ++i) {
        for (int t = 0; t < NT; ++t) acc[t][i] = _mm256_setzero_ps();
        if (i >= no) continue;
        const uint32_t* w = b.mask + (i0 + i) * b.words;
        for (int64_t q = 0; q < b.words; ++q) {
          const uint32_t word = w[q];
          for (int byte = 0; byte < 4; ++byte) {
            // Offsets from masked popcounts, not a running pointer: the 4 bytes are independent.
            const uint32_t bits = (word >> (8 * byte)) & 0xffu;
            const int before = __builtin_popcount(word & ((1u << (8 * byte)) - 1u));
            const int cnt = __builtin_popcount(bits);
            const __m256 packed =
                plain ? _mm256_loadu_ps(v + before)
                      : _mm256_maskload_ps(v + before, _mm256_load_si256(reinterpret_cast<const __m256i*>(
                                                           kExpand.prefix[cnt])));
            const __m256 dense = _mm256_and_ps(
                _mm256_permutevar8x32_ps(
                    packed,
                    _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.perm[bits]))),
                _mm256_castsi256_ps(
                    _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.lane[bits]))));
            for (int t = 0; t < NT; ++t) {
              acc[t][i] = _mm256_fmadd_ps(
                  dense, _mm256_loadu_ps(h + t * ldh + 32 * q + 8 * byte), acc[t][i]);
            }
          }
          v += __builtin_popcount(word);
        }
      }
      for (int t = 0; t < NT; ++t) {
        const int64_t tt = tok ? tok[t] : t;
        store_out(y + tt * b.out + i0, _mm256_mul_ps(reduce8(acc[t]), vscale), no, accumulate);
      }
    }
  }
  return -1;
}

// apply_b_expand_avx2 for a runtime token count in [1, 4].
template <typename scalar_t>
LORI_AVX2 int64_t apply_b_expand_any(int64_t T, const BView& b, int64_t rank, int64_t nnz,
                                     const float* h, int64_t ldh, float scale, scalar_t* y,
                                     int64_t c0, int64_t c1, const int64_t* tok = nullptr,
                                     bool accumulate = false, int64_t readable = -1) {
  if (cpu_paths().b_decode == Isa::kAvx512) {
    return apply_b_expand_avx512<scalar_t>(T, b, rank, nnz, h, ldh, scale, y, c0, c1, tok,
                                           accumulate);
  }
  switch (T) {
    case 1: return apply_b_expand_avx2<scalar_t, 1>(b, rank, nnz, h, ldh, scale, y, c0, c1, tok, accumulate, readable);
    case 2: return apply_b_expand_avx2<scalar_t, 2>(b, rank, nnz, h, ldh, scale, y, c0, c1, tok, accumulate, readable);
    case 3: return apply_b_expand_avx2<scalar_t, 3>(b, rank, nnz, h, ldh, scale, y, c0, c1, tok, accumulate, readable);
    default: return apply_b_expand_avx2<scalar_t, 4>(b, rank, nnz, h, ldh, scale, y, c0, c1, tok, accumulate, readable);
  }
}

constexpr int64_t kExpandMaxTokens = 4;  // up to this many tokens: apply_b_expand_avx2

}  // namespace lori::cpu

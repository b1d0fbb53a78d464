// CPU forward of sparse_delta: y = scale * (x @ A^T) @ B^T.
//
// Two stages: hT = A @ x^T (rank x T, A generated per tile, see delta_common.cpp), then the
// sparse B stage below, vectorized over 8 tokens: for 8 rows of B, acc[i] (8 tokens) +=
// v * hT[k] for each pattern entry (o_i, k), then an 8x8 transpose turns the 8 token vectors
// into 8 contiguous outputs per token.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "delta_common.h"
#include "lori/bitmask.h"
#include "simd.h"

namespace lori::cpu {
namespace {

// Rows of y for chunks [c0, c1): for each block of 8 tokens, acc[row] (8 tokens) +=
// v * hT[k] over the chunk's flat entry list, then 8x8 transposes write 8 outputs per token.
// Returns the first chunk that failed validation, or -1.
template <typename scalar_t>
LORI_AVX2 int64_t apply_b_avx2(const BView& b, int64_t rank, int64_t nnz, const float* hT,
                               int64_t T, int64_t Tp, float scale, scalar_t* y, int64_t c0,
                               int64_t c1) {
  const size_t cap = static_cast<size_t>(kRowChunk * b.words * 32 + 8);
  std::vector<int32_t> ks(cap), rows(cap);
  alignas(32) float acc[kRowChunk * 8];
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t n = extract_chunk(b, c, rank, nnz, ks.data(), rows.data());
    if (n < 0) return c;
    const int64_t row0 = c * kRowChunk, nrows = std::min(b.out, row0 + kRowChunk) - row0;
    const float* v = b.values + b.offsets[c];
    for (int64_t tb = 0; tb < Tp; tb += 8) {
      std::fill(acc, acc + nrows * 8, 0.f);
      for (int64_t e = 0; e < n; ++e) {
        float* a = acc + 8 * rows[e];
        _mm256_store_ps(a, _mm256_fmadd_ps(_mm256_set1_ps(v[e]),
                                           _mm256_loadu_ps(hT + ks[e] * Tp + tb),
                                           _mm256_load_ps(a)));
      }
      const int nt = static_cast<int>(std::min<int64_t>(8, T - tb));
      for (int64_t i0 = 0; i0 < nrows; i0 += 8) {
        const int no = static_cast<int>(std::min<int64_t>(8, nrows - i0));
        __m256 blk[8];
        for (int i = 0; i < 8; ++i) blk[i] = _mm256_load_ps(acc + 8 * (i0 + i));
        transpose8x8(blk);
        for (int l = 0; l < nt; ++l) {
          scalar_t* dst = y + (tb + l) * b.out + row0 + i0;
          const __m256 val = _mm256_mul_ps(blk[l], vscale);
          if (no == 8) {
            store8(dst, val);
          } else {
            store_partial(dst, val, no);
          }
        }
      }
    }
  }
  return -1;
}

// Decode path (T <= 4): vectorize over B's columns instead of tokens. Each byte of a mask
// row expands 8 packed values into a dense 8-lane vector (maskload + permute, no
// data-dependent branches), multiplied with h's matching 8 entries; 8 rows' accumulators
// reduce with an hadd tree. h is (NT, words * 32) fp32, zero past rank.
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
const ExpandTables kExpand;

LORI_AVX2 inline __m256 reduce8(const __m256 a[8]) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

template <typename scalar_t, int NT>
LORI_AVX2 int64_t apply_b_expand_avx2(const BView& b, int64_t rank, int64_t nnz, const float* h,
                                      int64_t ldh, float scale, scalar_t* y, int64_t c0,
                                      int64_t c1) {
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
            const __m256 packed = _mm256_maskload_ps(
                v + before, _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.prefix[cnt])));
            const __m256 dense = _mm256_and_ps(
                _mm256_permutevar8x32_ps(
                    packed, _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.perm[bits]))),
                _mm256_castsi256_ps(
                    _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.lane[bits]))));
            for (int t = 0; t < NT; ++t) {
              acc[t][i] = _mm256_fmadd_ps(dense, _mm256_loadu_ps(h + t * ldh + 32 * q + 8 * byte),
                                          acc[t][i]);
            }
          }
          v += __builtin_popcount(word);
        }
      }
      for (int t = 0; t < NT; ++t) {
        const __m256 out = _mm256_mul_ps(reduce8(acc[t]), vscale);
        scalar_t* dst = y + t * b.out + i0;
        if (no == 8) {
          store8(dst, out);
        } else {
          store_partial(dst, out, no);
        }
      }
    }
  }
  return -1;
}

at::Tensor sparse_delta_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                            const at::Tensor& offsets, int64_t rank, int64_t seed,
                            c10::string_view distribution, double scale) {
  const DeltaShape s = check_sparse_delta_args("sparse_delta", x, mask, values, offsets, rank,
                                               seed, distribution);
  auto out_shape = x.sizes().vec();
  out_shape.back() = s.out_features;
  at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t T = s.tokens, Tp = round_up8(T);
  if (T == 0 || s.out_features == 0) return y;
  const at::Tensor x2 = x.reshape({T, s.in_features});
  if (use_generic_path(x)) {
    check_bitmask_cpu("sparse_delta", mask, offsets, rank, values.numel());
    return sparse_delta_generic(x2, mask, values, s, scale).view(out_shape);
  }
  const at::Tensor m = mask.contiguous(), vf = values_f32(values), off = offsets.contiguous();
  // O(1) ends of offsets here; each chunk is checked against the mask inside the kernel
  // before any of its values are read (the walk needs the popcounts anyway).
  const int32_t* offp = off.data_ptr<int32_t>();
  const int64_t nchunks = num_chunks(s.out_features), nnz = values.numel();
  TORCH_CHECK_VALUE(offp[0] == 0, "sparse_delta: offsets[0] must be 0, got ", offp[0]);
  TORCH_CHECK_VALUE(offp[nchunks] == nnz, "sparse_delta: offsets[-1] = ", offp[nchunks],
                    " entries but values has ", nnz);
  const at::Tensor hT = compute_hT(x2, s);
  const BView b{reinterpret_cast<const uint32_t*>(m.data_ptr<int32_t>()), vf.data_ptr<float>(),
                off.data_ptr<int32_t>(), s.out_features, s.words};
  const float* h = hT.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  dispatch_io_type(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* yp = y.data_ptr<scalar_t>();
    std::atomic<int64_t> bad{-1};
    // Decode: h as (T, words * 32) rows for the column-vectorized expand path.
    at::Tensor hrow;
    if (T <= 4) hrow = at::constant_pad_nd(hT.narrow(1, 0, T).t(), {0, s.words * 32 - rank}).contiguous();
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      int64_t c = -1;
      if (T <= 4) {
        const float* hr = hrow.data_ptr<float>();
        const int64_t ld = s.words * 32;
        switch (T) {
          case 1: c = apply_b_expand_avx2<scalar_t, 1>(b, rank, nnz, hr, ld, sc, yp, c0, c1); break;
          case 2: c = apply_b_expand_avx2<scalar_t, 2>(b, rank, nnz, hr, ld, sc, yp, c0, c1); break;
          case 3: c = apply_b_expand_avx2<scalar_t, 3>(b, rank, nnz, hr, ld, sc, yp, c0, c1); break;
          default: c = apply_b_expand_avx2<scalar_t, 4>(b, rank, nnz, hr, ld, sc, yp, c0, c1); break;
        }
      } else {
        c = apply_b_avx2<scalar_t>(b, rank, nnz, h, T, Tp, sc, yp, c0, c1);
      }
      if (c >= 0) bad.store(c);
    });
    if (bad.load() >= 0) check_bitmask_cpu("sparse_delta", mask, offsets, rank, nnz);  // names it
    TORCH_CHECK_VALUE(bad.load() < 0, "sparse_delta: mask and offsets disagree in chunk ",
                      bad.load());
  });
  return y;
}

}  // namespace
}  // namespace lori::cpu

TORCH_LIBRARY_IMPL(lori, CPU, m) { m.impl("sparse_delta", &lori::cpu::sparse_delta_cpu); }

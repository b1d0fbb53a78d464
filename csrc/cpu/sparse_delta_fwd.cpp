// CPU forward of sparse_delta: y = scale * (x @ A^T) @ B^T.
//
// Two stages: hT = A @ x^T (rank x T, A generated per tile, see delta_common.cpp), then the
// sparse B stage below, vectorized over 8 tokens: for 8 rows of B, acc[i] (8 tokens) +=
// v * hT[k] for each pattern entry (o_i, k), then an 8x8 transpose turns the 8 token vectors
// into 8 contiguous outputs per token.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "delta_common.h"
#include "lori/bitmask.h"
#include "simd.h"

namespace lori::cpu {
namespace {

template <typename scalar_t>
LORI_AVX2 void apply_b_avx2(const BView& b, const float* hT, int64_t T, int64_t Tp, float scale,
                            scalar_t* y, int64_t c0, int64_t c1) {
  int32_t starts[kRowChunk];
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t nrows = chunk_rows(b, c, starts), row0 = c * kRowChunk;
    for (int64_t tb = 0; tb < Tp; tb += 8) {
      const int nt = static_cast<int>(std::min<int64_t>(8, T - tb));
      for (int64_t i0 = 0; i0 < nrows; i0 += 8) {
        const int no = static_cast<int>(std::min<int64_t>(8, nrows - i0));
        __m256 acc[8];
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
        for (int i = 0; i < no; ++i) {
          const int64_t o = row0 + i0 + i;
          const float* v = b.values + starts[i0 + i];
          for (int64_t w = 0; w < b.words; ++w) {
            uint32_t bits = b.mask[o * b.words + w];
            while (bits) {
              const int64_t k = 32 * w + ctz32(bits);
              bits &= bits - 1;
              acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(*v++), _mm256_loadu_ps(hT + k * Tp + tb),
                                       acc[i]);
            }
          }
        }
        transpose8x8(acc);
        for (int l = 0; l < nt; ++l) {
          scalar_t* dst = y + (tb + l) * b.out + row0 + i0;
          const __m256 val = _mm256_mul_ps(acc[l], vscale);
          if (no == 8) {
            store8(dst, val);
          } else {
            store_partial(dst, val, no);
          }
        }
      }
    }
  }
}

at::Tensor sparse_delta_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                            const at::Tensor& offsets, int64_t rank, int64_t seed,
                            c10::string_view distribution, double scale) {
  const DeltaShape s = check_sparse_delta_args("sparse_delta", x, mask, values, offsets, rank,
                                               seed, distribution);
  check_bitmask_cpu("sparse_delta", mask, offsets, rank, values.numel());
  auto out_shape = x.sizes().vec();
  out_shape.back() = s.out_features;
  at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t T = s.tokens, Tp = round_up8(T);
  if (T == 0 || s.out_features == 0) return y;
  const at::Tensor x2 = x.reshape({T, s.in_features});
  if (use_generic_path(x)) return sparse_delta_generic(x2, mask, values, s, scale).view(out_shape);
  const at::Tensor hT = compute_hT(x2, s);
  const at::Tensor m = mask.contiguous(), vf = values_f32(values), off = offsets.contiguous();
  const BView b{reinterpret_cast<const uint32_t*>(m.data_ptr<int32_t>()), vf.data_ptr<float>(),
                off.data_ptr<int32_t>(), s.out_features, s.words};
  const float* h = hT.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  dispatch_io_type(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, num_chunks(s.out_features), 1, [&](int64_t c0, int64_t c1) {
      apply_b_avx2<scalar_t>(b, h, T, Tp, sc, yp, c0, c1);
    });
  });
  return y;
}

}  // namespace
}  // namespace lori::cpu

TORCH_LIBRARY_IMPL(lori, CPU, m) { m.impl("sparse_delta", &lori::cpu::sparse_delta_cpu); }

#include "delta_common.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "agen.h"
#include "lori/bitmask.h"
#include "simd.h"

namespace lori::cpu {

void check_bitmask_cpu(const char* op, const at::Tensor& mask, const at::Tensor& offsets,
                       int64_t rank, int64_t nnz) {
  const at::Tensor m = mask.contiguous(), off = offsets.contiguous();
  const auto* w = reinterpret_cast<const uint32_t*>(m.data_ptr<int32_t>());
  const int32_t* o = off.data_ptr<int32_t>();
  const int64_t out = m.size(0), words = m.size(1);
  const uint32_t last_valid = last_word_valid_bits(static_cast<int>(rank));
  TORCH_CHECK_VALUE(o[0] == 0, op, ": offsets[0] must be 0, got ", o[0]);
  for (int64_t c = 0; c < num_chunks(out); ++c) {
    int64_t count = 0;
    const int64_t r_end = std::min<int64_t>(out, (c + 1) * kRowChunk);
    for (int64_t r = c * kRowChunk; r < r_end; ++r) {
      for (int64_t k = 0; k < words; ++k) count += popcount32(w[r * words + k]);
      TORCH_CHECK_VALUE((w[r * words + words - 1] & ~last_valid) == 0, op, ": mask row ", r,
                        " has bits set at positions >= rank (", rank, ")");
    }
    TORCH_CHECK_VALUE(o[c + 1] - static_cast<int64_t>(o[c]) == count, op, ": offsets[", c + 1,
                      "] - offsets[", c, "] = ", o[c + 1] - static_cast<int64_t>(o[c]),
                      " but mask rows [", c * kRowChunk, ", ", r_end, ") hold ", count,
                      " entries");
  }
  TORCH_CHECK_VALUE(o[num_chunks(out)] == nnz, op, ": mask holds ", o[num_chunks(out)],
                    " entries but values has ", nnz);
}

// Dense B (out, rank) in dtype from the (already validated) bitmask form.
at::Tensor dense_b(const at::Tensor& mask, const at::Tensor& values, int64_t rank,
                   at::ScalarType dtype) {
  const at::Tensor m = mask.contiguous();
  const at::Tensor v = values.to(at::kDouble).contiguous();
  const int64_t out = m.size(0), words = m.size(1);
  at::Tensor b = at::zeros({out, rank}, at::TensorOptions().dtype(at::kDouble));
  const auto* mw = reinterpret_cast<const uint32_t*>(m.data_ptr<int32_t>());
  const double* vp = v.data_ptr<double>();
  double* bp = b.data_ptr<double>();
  int64_t p = 0;
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t w = 0; w < words; ++w) {
      for (uint32_t bits = mw[o * words + w]; bits; bits &= bits - 1) {
        bp[o * rank + 32 * w + ctz32(bits)] = vp[p++];
      }
    }
  }
  return b.to(dtype);
}

at::Tensor values_f32(const at::Tensor& values) {
  return values.scalar_type() == at::kFloat ? values.contiguous()
                                            : values.to(at::kFloat).contiguous();
}

namespace {

// h[t] = sum_j x[t, j] * a[j] for t < T (x rows of length n, stride ldx); out[t] = h[t].
LORI_AVX2 void dot_rows_avx2(const float* x, int64_t T, int64_t n, int64_t ldx, const float* a,
                             float* out) {
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) {
    const float *x0 = x + t * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 av = _mm256_loadu_ps(a + j);
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + j), av, s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + j), av, s1);
      s2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + j), av, s2);
      s3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + j), av, s3);
    }
    float r0 = hsum8(s0), r1 = hsum8(s1), r2 = hsum8(s2), r3 = hsum8(s3);
    for (; j < n; ++j) {
      r0 += x0[j] * a[j];
      r1 += x1[j] * a[j];
      r2 += x2[j] * a[j];
      r3 += x3[j] * a[j];
    }
    out[t] = r0;
    out[t + 1] = r1;
    out[t + 2] = r2;
    out[t + 3] = r3;
  }
  for (; t < T; ++t) {
    const float* xr = x + t * ldx;
    __m256 s = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(xr + j), _mm256_loadu_ps(a + j), s);
    float r = hsum8(s);
    for (; j < n; ++j) r += xr[j] * a[j];
    out[t] = r;
  }
}

void dot_rows_scalar(const float* x, int64_t T, int64_t n, int64_t ldx, const float* a,
                     float* out) {
  for (int64_t t = 0; t < T; ++t) {
    float r = 0.f;
    for (int64_t j = 0; j < n; ++j) r += x[t * ldx + j] * a[j];
    out[t] = r;
  }
}

}  // namespace

at::Tensor compute_hT(const at::Tensor& x2, const DeltaShape& s) {
  const int64_t T = x2.size(0), in = s.in_features, rank = s.rank, Tp = round_up8(T);
  at::Tensor hT = at::zeros({rank, Tp}, x2.options().dtype(at::kFloat));
  if (T == 0) return hT;
  float* h = hT.data_ptr<float>();
  if (T <= kDirectMaxTokens) {
    const at::Tensor xf = x2.to(at::kFloat).contiguous();
    const float* xp = xf.data_ptr<float>();
    const bool avx2 = has_avx2();
    at::parallel_for(0, rank, 1, [&](int64_t r0, int64_t r1) {
      std::vector<float> row(static_cast<size_t>(in));
      for (int64_t r = r0; r < r1; ++r) {
        gen_a_tile(s.gen, r, r + 1, 0, in, row.data(), in);
        if (avx2) {
          dot_rows_avx2(xp, T, in, in, row.data(), h + r * Tp);
        } else {
          dot_rows_scalar(xp, T, in, in, row.data(), h + r * Tp);
        }
      }
    });
    return hT;
  }
  at::Tensor hv = hT.narrow(1, 0, T);
  for (int64_t k0 = 0; k0 < in; k0 += kGemmTile) {
    const int64_t kt = std::min(kGemmTile, in - k0);
    at::Tensor at_ = at::empty({rank, kt}, hT.options());
    float* ap = at_.data_ptr<float>();
    at::parallel_for(0, rank, 1, [&](int64_t r0, int64_t r1) {
      gen_a_tile(s.gen, r0, r1, k0, k0 + kt, ap + r0 * kt, kt);
    });
    at::Tensor xt = x2.narrow(1, k0, kt);
    if (xt.scalar_type() != at::kFloat) xt = xt.to(at::kFloat);
    hv.addmm_(at_, xt.t());
  }
  return hT;
}

}  // namespace lori::cpu

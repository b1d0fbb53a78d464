// CPU forward of sparse_delta: y = scale * (x @ A^T) @ B^T.
//
// Two stages: hT = A @ x^T (rank x T, A generated per tile, see delta_common.cpp), then the
// sparse B stage below, vectorized over 8 tokens: for 8 rows of B, acc[i] (8 tokens) +=
// v * hT[k] for each pattern entry (o_i, k), then an 8x8 transpose turns the 8 token vectors
// into 8 contiguous outputs per token.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "b_stage.h"
#include "delta_common.h"
#include "lori/bitmask.h"
#include "simd.h"

namespace lori::cpu {
namespace {

// y, and h = x @ A^T as (T, rank) when keep_h (else an undefined tensor).
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& mask,
                                                const at::Tensor& values, const at::Tensor& offsets,
                                                int64_t rank, int64_t seed,
                                                c10::string_view distribution, double scale,
                                                bool keep_h, int64_t col_start,
                                                int64_t in_features) {
  const DeltaShape s = check_sparse_delta_args("sparse_delta", x, mask, values, offsets, rank,
                                               seed, distribution, scale, col_start,
                                               in_features);
  auto out_shape = x.sizes().vec();
  out_shape.back() = s.out_features;
  at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t T = s.tokens, Tp = round_up8(T);
  const auto hdtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (T == 0) return {y, keep_h ? at::zeros({0, rank}, x.options().dtype(hdtype)) : at::Tensor()};
  if (s.out_features == 0 && !keep_h) return {y, at::Tensor()};
  const at::Tensor x2 = x.reshape({T, s.in_features});
  if (s.out_features == 0) {
    // No B rows, but h = x @ A^T does not depend on B: the backward reuses it.
    check_bitmask_cpu("sparse_delta", mask, offsets, rank, values.numel());
    if (use_generic_path(x)) {
      at::Tensor h;
      sparse_delta_generic(x2, mask, values, s, scale, &h);
      return {y, h};
    }
    return {y, compute_hT(x2, s).narrow(1, 0, T).t().contiguous()};
  }
  if (use_generic_path(x)) {
    check_bitmask_cpu("sparse_delta", mask, offsets, rank, values.numel());
    at::Tensor h;
    at::Tensor y2 = sparse_delta_generic(x2, mask, values, s, scale, keep_h ? &h : nullptr);
    return {y2.view(out_shape), h};
  }
  const at::Tensor m = mask.contiguous(), vf = values_f32(values), off = offsets.contiguous();
  // Each chunk is checked against the mask inside the kernel before any of its values are
  // read (the walk needs the popcounts anyway).
  const int64_t nchunks = num_chunks(s.out_features), nnz = values.numel();
  check_offset_ends("sparse_delta", off.data_ptr<int32_t>(), nchunks, nnz);
  const BView b{reinterpret_cast<const uint32_t*>(m.data_ptr<int32_t>()), vf.data_ptr<float>(),
                off.data_ptr<int32_t>(), s.out_features, s.words};
  const float sc = static_cast<float>(scale);
  const bool decode = T <= kExpandMaxTokens;
  at::Tensor hT;
  if (decode) {
    hT = at::zeros({rank, Tp}, x.options().dtype(at::kFloat));
  } else {
    hT = compute_hT(x2, s);
  }
  float* h = hT.data_ptr<float>();
  dispatch_io_type(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* yp = y.data_ptr<scalar_t>();
    std::atomic<int64_t> bad{-1};
    if (decode) {
      // Decode: both stages in one parallel region (a fork/join is a few percent of a
      // one-token call): A's rows split over the threads, a barrier, then B's chunks, each
      // thread reading h as (T, words * 32) rows for the column-vectorized expand kernel.
      const at::Tensor xf = x2.to(at::kFloat).contiguous();
      const DirectA da(xf.data_ptr<float>(), T, s.in_features, s);
      const int nt = at::in_parallel_region() ? 1 : static_cast<int>(at::get_num_threads());
      const int64_t ld = s.words * 32;
#pragma omp parallel num_threads(nt)
      {
        const int64_t tid = omp_get_thread_num(), n = omp_get_num_threads();
        da.rows(rank * tid / n, rank * (tid + 1) / n, h, Tp);
#pragma omp barrier
        alignas(64) float hrow[kExpandMaxTokens * kMaxRank] = {};  // zero past rank
        for (int64_t t = 0; t < T; ++t) {
          for (int64_t k = 0; k < rank; ++k) hrow[t * ld + k] = h[k * Tp + t];
        }
        const int64_t c = apply_b_expand_any<scalar_t>(T, b, rank, nnz, hrow, ld, sc, yp,
                                                       nchunks * tid / n,
                                                       nchunks * (tid + 1) / n);
        if (c >= 0) bad.store(c);
      }
    } else {
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        const int64_t c = apply_b_avx2<scalar_t>(b, rank, nnz, h, T, Tp, sc, yp, c0, c1);
        if (c >= 0) bad.store(c);
      });
    }
    if (bad.load() >= 0) check_bitmask_cpu("sparse_delta", mask, offsets, rank, nnz);  // names it
    TORCH_CHECK_VALUE(bad.load() < 0, "sparse_delta: mask and offsets disagree in chunk ",
                      bad.load());
  });
  return {y, keep_h ? hT.narrow(1, 0, T).t().contiguous() : at::Tensor()};
}

at::Tensor sparse_delta_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                            const at::Tensor& offsets, int64_t rank, int64_t seed,
                            c10::string_view distribution, double scale, int64_t col_start,
                            int64_t in_features) {
  return std::get<0>(forward_impl(x, mask, values, offsets, rank, seed, distribution, scale,
                                  false, col_start, in_features));
}

std::tuple<at::Tensor, at::Tensor> sparse_delta_fwd_cpu(
    const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
    const at::Tensor& offsets, int64_t rank, int64_t seed, c10::string_view distribution,
    double scale, int64_t col_start, int64_t in_features) {
  return forward_impl(x, mask, values, offsets, rank, seed, distribution, scale, true,
                      col_start, in_features);
}

// shrink: h = x @ A_window^T, (..., rank), the x -> h stage of the forward above.
at::Tensor shrink_cpu(const at::Tensor& x, int64_t rank, int64_t seed,
                      c10::string_view distribution, int64_t col_start, int64_t in_features) {
  const DeltaShape s = check_shrink_args("shrink", x, rank, seed, distribution, col_start,
                                         in_features);
  auto shape = x.sizes().vec();
  shape.back() = rank;
  const auto hdtype = acc_dtype_of(x.scalar_type());
  const int64_t T = s.tokens;
  if (T == 0) return at::zeros(shape, x.options().dtype(hdtype));
  const at::Tensor x2 = x.reshape({T, s.in_features});
  at::Tensor h;
  if (use_generic_path(x)) {
    h = shrink_generic(x2, s);
  } else {
    h = compute_hT(x2, s).narrow(1, 0, T).t().contiguous();
  }
  return h.view(shape);
}

// expand: y = scale * h @ B^T in values' dtype, the h -> y stage of the forward above.
at::Tensor expand_cpu(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& values,
                      const at::Tensor& offsets, double scale) {
  const char* op = "expand";
  const DeltaShape s = check_expand_args(op, h, mask, values, offsets, scale);
  const int64_t T = s.tokens, rank = s.rank;
  auto out_shape = h.sizes().vec();
  out_shape.back() = s.out_features;
  at::Tensor y = at::empty(out_shape, h.options().dtype(values.scalar_type()));
  if (T == 0 || s.out_features == 0) return y;
  const at::Tensor h2 = h.reshape({T, rank});
  if (values.scalar_type() == at::kDouble || cpu_paths().generic_ops) {
    check_bitmask_cpu(op, mask, offsets, rank, values.numel());
    const auto acc = acc_dtype_of(values.scalar_type());
    const at::Tensor y2 = at::mm(h2, dense_b(mask, values, rank, acc).t()).mul_(scale);
    return y2.to(values.scalar_type()).view(out_shape);
  }
  const at::Tensor m = mask.contiguous(), vf = values_f32(values), off = offsets.contiguous();
  const int64_t nchunks = num_chunks(s.out_features), nnz = values.numel();
  check_offset_ends(op, off.data_ptr<int32_t>(), nchunks, nnz);
  const BView b{reinterpret_cast<const uint32_t*>(m.data_ptr<int32_t>()), vf.data_ptr<float>(),
                off.data_ptr<int32_t>(), s.out_features, s.words};
  const float sc = static_cast<float>(scale);
  std::atomic<int64_t> bad{-1};
  dispatch_io_type(values.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (T <= kExpandMaxTokens) {
      // h as (T, words * 32) rows, zero past rank, for the column-vectorized expand kernel.
      const int64_t ld = s.words * 32;
      alignas(64) float hrow[kExpandMaxTokens * kMaxRank] = {};
      const at::Tensor hc = h2.contiguous();
      const float* hp = hc.data_ptr<float>();
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t k = 0; k < rank; ++k) hrow[t * ld + k] = hp[t * rank + k];
      }
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        const int64_t c = apply_b_expand_any<scalar_t>(T, b, rank, nnz, hrow, ld, sc, yp, c0, c1);
        if (c >= 0) bad.store(c);
      });
    } else {
      const int64_t Tp = round_up8(T);
      at::Tensor hT = at::zeros({rank, Tp}, h.options());
      hT.narrow(1, 0, T).copy_(h2.t());
      const float* hp = hT.data_ptr<float>();
      at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
        const int64_t c = apply_b_avx2<scalar_t>(b, rank, nnz, hp, T, Tp, sc, yp, c0, c1);
        if (c >= 0) bad.store(c);
      });
    }
  });
  if (bad.load() >= 0) check_bitmask_cpu(op, mask, offsets, rank, nnz);  // names it
  TORCH_CHECK_VALUE(bad.load() < 0, op, ": mask and offsets disagree in chunk ", bad.load());
  return y;
}

}  // namespace
}  // namespace lori::cpu

TORCH_LIBRARY_IMPL(lori, CPU, m) {
  m.impl("sparse_delta", &lori::cpu::sparse_delta_cpu);
  m.impl("sparse_delta_fwd", &lori::cpu::sparse_delta_fwd_cpu);
  m.impl("shrink", &lori::cpu::shrink_cpu);
  m.impl("expand", &lori::cpu::expand_cpu);
}

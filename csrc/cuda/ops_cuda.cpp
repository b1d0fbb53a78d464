// CUDA registrations of the lori ops: argument checks (shared with the CPU backend through
// checks.h), launch planning and allocation. Kernels are in the .cu files of this folder.
//
// What the CUDA backend trusts: the host checks every dtype, shape and device (checks.h) but
// cannot afford the CPU backend's full read of the mask per call (check_bitmask_cpu), so it
// does not verify that offsets match the mask's popcounts or that offsets[-1] == nnz. The
// kernels clear mask bits >= rank and clamp every value read and write of chunk c into
// [offsets[c], offsets[c+1]) within [0, nnz): a corrupt B yields wrong numbers, never an
// out-of-bounds access. Validate untrusted adapters once with PackedB.validate().
//
// Dtypes: float32, bfloat16, float16 (fp32 accumulation) and float64 (fp64 accumulation, for
// gradcheck; the same SIMT kernels). bf16/fp16 prefill (T > 16, rank <= 64) runs the x @ A^T
// stage on tensor cores for Rademacher A only (its +-1 units are exact in bf16/fp16 and the
// magnitude is applied in fp32 afterwards); uniform A takes the SIMT kernel, which uses A's fp32
// values (docs/spec_a.md section 5: h, which sparse_delta_fwd returns, must not carry A rounded
// to bf16).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>

#include "../checks.h"
#include "host_common.h"
#include "kernels.cuh"
#include "lori/bitmask.h"
#include "lori/philox.h"

namespace lori::cuda {
namespace {

AGen to_agen(const AGenParams& p) { return AGen{p.k0, p.k1, p.dist, p.magnitude, p.col0}; }

BMask to_bmask(const at::Tensor& mask, const at::Tensor& offsets, int64_t rank, int64_t nnz) {
  return BMask{reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>()),
               offsets.data_ptr<int32_t>(), mask.size(0), nnz, static_cast<int>(mask.size(1)),
               static_cast<int>(rank)};
}

// h partials (S, T, rank) = x2 @ A^T split over in_features (tensor cores where they apply:
// Rademacher only, see the header).
std::pair<at::Tensor, int> shrink_a(const char* op, const at::Tensor& x2, const DeltaShape& s,
                                    cudaStream_t stream) {
  const int64_t T = s.tokens;
  const bool mma_shape = T > kSmallTile && s.rank <= 64 && s.gen.dist == kRademacher &&
                         (x2.scalar_type() == at::kBFloat16 || x2.scalar_type() == at::kHalf) &&
                         has_bf16_mma(x2.get_device());
  const int tile = mma_shape ? kLargeTile : token_tile(T, x2.scalar_type(), s.rank);
  const Split sp = plan_split(s.in_features, 64, (T + tile - 1) / tile, sm_count(x2.get_device()),
                              T > kSmallTile ? INT32_MAX : decode_split_cap(T));
  check_grid_y(op, sp.splits, "column slices");
  at::Tensor partial = at::empty({sp.splits, T, s.rank}, x2.options().dtype(acc_dtype(x2.scalar_type())));
  const AGen g = to_agen(s.gen);
  dispatch(op, x2.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* xp = x2.data_ptr<scalar_t>();
    acc_t* pp = partial.data_ptr<acc_t>();
    const int rank = static_cast<int>(s.rank);
    if (!(mma_shape && launch_shrink_a_mma<scalar_t>(xp, T, s.in_features, g, rank, sp.splits,
                                                     sp.per_split, pp, stream))) {
      launch_shrink_a<scalar_t>(xp, T, s.in_features, g, rank, sp.splits, sp.per_split, tile, pp,
                                stream);
    }
  });
  return {partial, sp.splits};
}

// y = scale * (x A^T) B^T, and with keep_h also h = x A^T (T, rank) in the accumulation dtype
// (sparse_delta_fwd, for the backward to reuse): then the partials are always summed first.
std::tuple<at::Tensor, at::Tensor> forward_impl(const char* op, const at::Tensor& x,
                                                const at::Tensor& mask, const at::Tensor& values,
                                                const at::Tensor& offsets, int64_t rank,
                                                int64_t seed, c10::string_view distribution,
                                                double scale, bool keep_h, int64_t col_start,
                                                int64_t in_features) {
  const DeltaShape s = check_sparse_delta_args(op, x, mask, values, offsets, rank, seed,
                                               distribution, scale, col_start, in_features);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out_shape = x.sizes().vec();
  out_shape.back() = s.out_features;
  at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t T = s.tokens;
  const auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  if (T == 0 || (s.out_features == 0 && !keep_h)) {
    return {y, keep_h ? at::zeros({T, rank}, acc) : at::Tensor()};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x2 = x.reshape({T, s.in_features}).contiguous();
  const at::Tensor m = mask.contiguous(), v = values.contiguous(), off = offsets.contiguous();
  check_grid_y(op, num_chunks(s.out_features), "64-row chunks of B");
  const auto hp = shrink_a(op, x2, s, stream);
  // Decode: expand_b sums the few (T x rank) partials itself. Prefill: every chunk block would
  // re-read all of them, so they are summed once first (a plain fixed-order reduction).
  const bool presum = hp.second > 1 && (T > kSmallTile || keep_h);
  const at::Tensor partial = presum ? hp.first.sum(0, /*keepdim=*/true) : hp.first;
  const int splits = presum ? 1 : hp.second;
  at::Tensor h = keep_h ? partial[0] : at::Tensor();  // (T, rank) when keep_h (splits == 1)
  if (s.out_features == 0) return {y, h};
  const BMask b = to_bmask(m, off, rank, v.numel());
  const int tile = token_tile(T, x.scalar_type(), rank);
  const int64_t tiles = (T + tile - 1) / tile, nch = num_chunks(s.out_features);
  // Chunks per block: up to 4 (h read once per 256 rows) while >= 4 blocks per SM remain.
  int64_t cpb = 4;
  while (cpb > 1 && tiles * ((nch + cpb - 1) / cpb) < 4 * sm_count(x.get_device())) cpb /= 2;
  // bf16/fp16 prefill with rank <= 64: the tensor-core expand (tile = 64 tokens, like
  // token_tile's large tile, so cpb above holds); otherwise the SIMT one.
  const bool mma = splits == 1 && tile == kLargeTile && rank <= 64 &&
                   (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) &&
                   has_bf16_mma(x.get_device());
  dispatch(op, x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (mma && launch_expand_b_mma<scalar_t>(partial.data_ptr<float>(), T, b,
                                               v.data_ptr<scalar_t>(), scale, cpb,
                                               y.data_ptr<scalar_t>(), stream)) {
        return;
      }
    }
    launch_expand_b<scalar_t>(partial.data_ptr<acc_t>(), splits, T, b, v.data_ptr<scalar_t>(),
                              scale, tile, cpb, y.data_ptr<scalar_t>(), stream);
  });
  return {y, h};
}

at::Tensor sparse_delta_cuda(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                             const at::Tensor& offsets, int64_t rank, int64_t seed,
                             c10::string_view distribution, double scale, int64_t col_start,
                             int64_t in_features) {
  return std::get<0>(forward_impl("sparse_delta", x, mask, values, offsets, rank, seed,
                                  distribution, scale, false, col_start, in_features));
}

// (y, h = x @ A^T): the forward autograd would use when B's values need a gradient (the
// backward then skips recomputing h). h is (T, rank) fp32 (float64 for float64 x).
std::tuple<at::Tensor, at::Tensor> sparse_delta_fwd_cuda(
    const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
    const at::Tensor& offsets, int64_t rank, int64_t seed, c10::string_view distribution,
    double scale, int64_t col_start, int64_t in_features) {
  // Errors name "sparse_delta", as the CPU backend's do for both forward ops.
  return forward_impl("sparse_delta", x, mask, values, offsets, rank, seed, distribution,
                      scale, true, col_start, in_features);
}

// h, when given and non-empty, is sparse_delta_fwd's x @ A^T: grad_values then skips the
// shrink_a that recomputes it (checked like the CPU backend: (T, rank), fp32 / fp64, x's
// device).
std::tuple<at::Tensor, at::Tensor> sparse_delta_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mask,
    const at::Tensor& values, const at::Tensor& offsets, int64_t rank, int64_t seed,
    c10::string_view distribution, double scale, bool need_x, bool need_values,
    const std::optional<at::Tensor>& h_in, int64_t col_start, int64_t in_features) {
  const char* op = "sparse_delta_backward";
  const DeltaShape s = check_sparse_delta_args(op, x, mask, values, offsets, rank, seed,
                                               distribution, scale, col_start, in_features);
  check_grad_y(op, grad_y, x, s);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = s.tokens;
  const at::Tensor h_saved = checked_saved_h(op, h_in, x, s);
  const bool empty = T == 0 || s.out_features == 0;
  // grad_x is fully written by expand_a unless there is nothing to reduce.
  at::Tensor gx = !need_x ? at::empty({0}, x.options())
                  : empty ? at::zeros(x.sizes(), x.options())
                          : at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor gv = need_values ? at::zeros_like(values)
                              : at::empty({0}, values.options());
  if (empty || (!need_x && !need_values)) return {gx, gv};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor gy2 = grad_y.reshape({T, s.out_features}).contiguous();
  const at::Tensor m = mask.contiguous(), v = values.contiguous(), off = offsets.contiguous();
  const BMask b = to_bmask(m, off, rank, v.numel());
  const int64_t nch = num_chunks(s.out_features);
  const int sms = sm_count(x.get_device());
  const auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  // bf16/fp16 prefill with rank <= 64: tensor-core kernels (their launchers decline, and the
  // SIMT ones run, when gy's rows are not 16-byte aligned).
  const bool mma = T > kSmallTile && rank <= 64 &&
                   (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) &&
                   has_bf16_mma(x.get_device());
  const int64_t mma_tiles = (T + kMmaTM - 1) / kMmaTM;
  if (need_x) {
    const AGen g = to_agen(s.gen);
    bool done = false;
    if (mma) {
      const Split sp = plan_split(nch, 1, mma_tiles, sms);
      check_grid_y(op, sp.splits, "chunk groups");
      at::Tensor gh = at::empty({sp.splits, T, rank}, acc);
      dispatch(op, x.scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        if constexpr (std::is_same_v<acc_type_t<scalar_t>, float>) {
          if (!launch_shrink_b_mma<scalar_t>(gy2.data_ptr<scalar_t>(), T, b,
                                             v.data_ptr<scalar_t>(), sp.splits, sp.per_split,
                                             gh.data_ptr<float>(), stream)) {
            return;
          }
          if (sp.splits > 1) gh = gh.sum(0);
          const int64_t ntiles = (s.in_features + kAColTileHost - 1) / kAColTileHost;
          int64_t tpb = 4;
          while (tpb > 1 && mma_tiles * ((ntiles + tpb - 1) / tpb) < 4 * sms) tpb /= 2;
          check_grid_y(op, (ntiles + tpb - 1) / tpb, "column-tile groups");
          done = launch_expand_a_mma<scalar_t>(gh.data_ptr<float>(), T, s.in_features, g,
                                               static_cast<int>(rank), scale, tpb,
                                               gx.data_ptr<scalar_t>(), stream);
          TORCH_INTERNAL_ASSERT(done, op, ": expand_a_mma declined after shrink_b_mma ran");
        }
      });
    }
    if (!done) {
      const int tile = token_tile(T, x.scalar_type(), rank);
      const Split sp = plan_split(nch, 1, (T + tile - 1) / tile, sms,
                                  T > kSmallTile ? INT32_MAX : decode_split_cap(T));
      check_grid_y(op, sp.splits, "chunk groups");
      check_grid_y(op, (T + tile - 1) / tile, "token tiles");
      at::Tensor gh = at::empty({sp.splits, T, rank}, acc);
      dispatch(op, x.scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        launch_shrink_b<scalar_t>(gy2.data_ptr<scalar_t>(), T, b, v.data_ptr<scalar_t>(),
                                  sp.splits, sp.per_split, tile,
                                  gh.data_ptr<acc_type_t<scalar_t>>(), stream);
      });
      // As in the forward: prefill sums the partials once instead of once per column tile.
      const bool presum = sp.splits > 1 && T > kSmallTile;
      if (presum) gh = gh.sum(0, /*keepdim=*/true);
      const int splits = presum ? 1 : sp.splits;
      dispatch(op, x.scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        launch_expand_a<scalar_t>(gh.data_ptr<acc_type_t<scalar_t>>(), splits, T,
                                  s.in_features, g, static_cast<int>(rank), scale, tile,
                                  gx.data_ptr<scalar_t>(), stream);
      });
    }
  }
  if (need_values) {
    at::Tensor h;
    if (h_saved.defined()) {
      h = h_saved.contiguous();
    } else {
      const at::Tensor x2 = x.reshape({T, s.in_features}).contiguous();
      const auto hp = shrink_a(op, x2, s, stream);
      // (T, rank); a plain sum over dim 0 of a contiguous tensor: fixed order, deterministic.
      h = hp.second == 1 ? hp.first[0] : hp.first.sum(0);
    }
    bool done = false;
    if (mma) {
      const Split sp = plan_split(T, kMmaTM, nch, sms);
      check_grid_y(op, sp.splits, "token slices");
      at::Tensor gbp = at::empty({sp.splits, s.out_features, rank}, acc);
      dispatch(op, x.scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        if constexpr (std::is_same_v<acc_type_t<scalar_t>, float>) {
          done = launch_grad_values_mma<scalar_t>(gy2.data_ptr<scalar_t>(), h.data_ptr<float>(),
                                                  T, b, sp.splits, sp.per_split, scale,
                                                  gbp.data_ptr<float>(),
                                                  gv.data_ptr<scalar_t>(), stream);
        }
      });
    }
    if (!done) {
      const Split sp = plan_split(T, 32, nch, sms);
      check_grid_y(op, sp.splits, "token slices");
      at::Tensor gbp = at::empty({sp.splits, s.out_features, rank}, acc);
      dispatch(op, x.scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        using acc_t = acc_type_t<scalar_t>;
        launch_grad_values<scalar_t>(gy2.data_ptr<scalar_t>(), h.data_ptr<acc_t>(), T, b,
                                     sp.splits, sp.per_split, scale, gbp.data_ptr<acc_t>(),
                                     gv.data_ptr<scalar_t>(), stream);
      });
    }
  }
  return {gx, gv};
}

void merge_delta_cuda(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& values,
                      const at::Tensor& offsets, int64_t rank, int64_t seed,
                      c10::string_view distribution, double scale, int64_t col_start,
                      int64_t in_features) {
  const char* op = "merge_delta_";
  const DeltaShape s = check_merge_delta_args(op, weight, mask, values, offsets, rank, seed,
                                              distribution, scale, col_start, in_features);
  const c10::cuda::CUDAGuard guard(weight.device());
  if (weight.numel() == 0) return;
  check_grid_y(op, num_chunks(s.out_features), "64-row chunks of B");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool direct = weight.stride(1) == 1 && weight.stride(0) >= weight.size(1);
  at::Tensor w = direct ? weight : weight.contiguous();
  const at::Tensor m = mask.contiguous(), v = values.contiguous(), off = offsets.contiguous();
  const BMask b = to_bmask(m, off, rank, v.numel());
  const AGen g = to_agen(s.gen);
  dispatch(op, weight.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_merge<scalar_t>(w.data_ptr<scalar_t>(), w.stride(0), s.in_features, b,
                           v.data_ptr<scalar_t>(), g, scale, stream);
  });
  if (!direct) weight.copy_(w);
}

// shrink: h = x @ A_window^T (..., rank) in the accumulation dtype; the forward's shrink_a with
// its partials summed in a fixed order.
at::Tensor shrink_cuda(const at::Tensor& x, int64_t rank, int64_t seed,
                       c10::string_view distribution, int64_t col_start, int64_t in_features) {
  const char* op = "shrink";
  const DeltaShape s = check_shrink_args(op, x, rank, seed, distribution, col_start, in_features);
  const c10::cuda::CUDAGuard guard(x.device());
  auto shape = x.sizes().vec();
  shape.back() = rank;
  const int64_t T = s.tokens;
  if (T == 0) return at::zeros(shape, x.options().dtype(acc_dtype(x.scalar_type())));
  const at::Tensor x2 = x.reshape({T, s.in_features}).contiguous();
  const auto hp = shrink_a(op, x2, s, c10::cuda::getCurrentCUDAStream());
  const at::Tensor h = hp.second == 1 ? hp.first[0] : hp.first.sum(0);
  return h.reshape(shape);
}

// expand: y = scale * h @ B^T in values' dtype; the forward's expand_b with one "partial".
at::Tensor expand_cuda(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& values,
                       const at::Tensor& offsets, double scale) {
  const char* op = "expand";
  const DeltaShape s = check_expand_args(op, h, mask, values, offsets, scale);
  const c10::cuda::CUDAGuard guard(h.device());
  auto out_shape = h.sizes().vec();
  out_shape.back() = s.out_features;
  at::Tensor y = at::empty(out_shape, h.options().dtype(values.scalar_type()));
  const int64_t T = s.tokens, rank = s.rank;
  if (T == 0 || s.out_features == 0) return y;
  check_grid_y(op, num_chunks(s.out_features), "64-row chunks of B");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor h2 = h.reshape({T, rank}).contiguous();
  const at::Tensor m = mask.contiguous(), v = values.contiguous(), off = offsets.contiguous();
  const BMask b = to_bmask(m, off, rank, v.numel());
  const int tile = token_tile(T, values.scalar_type(), rank);
  const int64_t tiles = (T + tile - 1) / tile, nch = num_chunks(s.out_features);
  int64_t cpb = 4;
  while (cpb > 1 && tiles * ((nch + cpb - 1) / cpb) < 4 * sm_count(h.get_device())) cpb /= 2;
  dispatch(op, values.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type_t<scalar_t>;
    launch_expand_b<scalar_t>(h2.data_ptr<acc_t>(), 1, T, b, v.data_ptr<scalar_t>(), scale, tile,
                              cpb, y.data_ptr<scalar_t>(), stream);
  });
  return y;
}

// grad_x = grad_h @ A_window: the backward's expand_a on one "partial".
at::Tensor shrink_backward_cuda(const at::Tensor& grad_h, int64_t width, at::ScalarType dtype,
                                int64_t rank, int64_t seed, c10::string_view distribution,
                                int64_t col_start, int64_t in_features) {
  const char* op = "shrink_backward";
  const DeltaShape s = check_shrink_backward_args(op, grad_h, width, dtype, rank, seed,
                                                  distribution, col_start, in_features);
  const c10::cuda::CUDAGuard guard(grad_h.device());
  auto shape = grad_h.sizes().vec();
  shape.back() = width;
  const int64_t T = s.tokens;
  if (T == 0) return at::zeros(shape, grad_h.options().dtype(dtype));
  at::Tensor gx = at::empty({T, width}, grad_h.options().dtype(dtype));
  const at::Tensor gh = grad_h.reshape({T, rank}).contiguous();
  const int tile = token_tile(T, dtype, rank);
  check_grid_y(op, (T + tile - 1) / tile, "token tiles");
  const AGen g = to_agen(s.gen);
  dispatch(op, dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_expand_a<scalar_t>(gh.data_ptr<acc_type_t<scalar_t>>(), 1, T, width, g,
                              static_cast<int>(rank), 1.0, tile, gx.data_ptr<scalar_t>(),
                              c10::cuda::getCurrentCUDAStream());
  });
  return gx.view(shape);
}

// (grad_h, grad_values) of expand: the backward's shrink_b and grad_values kernels.
std::tuple<at::Tensor, at::Tensor> expand_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& h, const at::Tensor& mask,
    const at::Tensor& values, const at::Tensor& offsets, double scale, bool need_h,
    bool need_values) {
  const char* op = "expand_backward";
  const DeltaShape s = check_expand_args(op, h, mask, values, offsets, scale);
  check_expand_grad_y(op, grad_y, h, values, s);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t T = s.tokens, rank = s.rank;
  at::Tensor gh = need_h ? at::zeros(h.sizes(), h.options()) : at::empty({0}, h.options());
  at::Tensor gv = need_values ? at::zeros_like(values) : at::empty({0}, values.options());
  if (T == 0 || s.out_features == 0 || (!need_h && !need_values)) return {gh, gv};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor gy2 = grad_y.reshape({T, s.out_features}).contiguous();
  const at::Tensor m = mask.contiguous(), v = values.contiguous(), off = offsets.contiguous();
  const BMask b = to_bmask(m, off, rank, v.numel());
  const int64_t nch = num_chunks(s.out_features);
  const int sms = sm_count(h.get_device());
  const auto vt = values.scalar_type();
  if (need_h) {
    const int tile = token_tile(T, vt, rank);
    const Split sp = plan_split(nch, 1, (T + tile - 1) / tile, sms,
                                T > kSmallTile ? INT32_MAX : decode_split_cap(T));
    check_grid_y(op, sp.splits, "chunk groups");
    check_grid_y(op, (T + tile - 1) / tile, "token tiles");
    at::Tensor part = at::empty({sp.splits, T, rank}, h.options());
    dispatch(op, vt, [&](auto tag) {
      using scalar_t = decltype(tag);
      launch_shrink_b<scalar_t>(gy2.data_ptr<scalar_t>(), T, b, v.data_ptr<scalar_t>(),
                                sp.splits, sp.per_split, tile,
                                part.data_ptr<acc_type_t<scalar_t>>(), stream);
    });
    gh.view({T, rank}).copy_(part.sum(0).mul_(scale));
  }
  if (need_values) {
    const at::Tensor h2 = h.reshape({T, rank}).contiguous();
    const Split sp = plan_split(T, 32, nch, sms);
    check_grid_y(op, sp.splits, "token slices");
    at::Tensor gbp = at::empty({sp.splits, s.out_features, rank}, h.options());
    dispatch(op, vt, [&](auto tag) {
      using scalar_t = decltype(tag);
      using acc_t = acc_type_t<scalar_t>;
      launch_grad_values<scalar_t>(gy2.data_ptr<scalar_t>(), h2.data_ptr<acc_t>(), T, b,
                                   sp.splits, sp.per_split, scale, gbp.data_ptr<acc_t>(),
                                   gv.data_ptr<scalar_t>(), stream);
    });
  }
  return {gh, gv};
}

void random_a_fill_cuda(const at::Tensor& out, int64_t seed, int64_t in_features,
                        int64_t col_start, c10::string_view distribution) {
  const char* op = "_random_a_fill";
  TORCH_CHECK(out.is_cuda(), op, ": out must be a CUDA tensor");
  TORCH_CHECK_VALUE(out.dim() == 2, op, ": out must be 2-D (rank, columns)");
  const AGenParams p = make_agen(seed, in_features, distribution);
  const int64_t rank = out.size(0), ncols = out.size(1);
  TORCH_CHECK_VALUE(col_start >= 0 && col_start <= in_features - ncols, op, ": columns [",
                    col_start, ", ", col_start + ncols, ") exceed in_features=", in_features);
  TORCH_CHECK_VALUE(rank <= UINT32_MAX, op, ": rank too large: ", rank);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool direct = out.stride(1) == 1 && out.stride(0) >= ncols;
  at::Tensor buf = direct ? out : at::empty({rank, ncols}, out.options());
  dispatch(op, out.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_random_a<scalar_t>(buf.data_ptr<scalar_t>(), rank, ncols, buf.stride(0), col_start,
                              to_agen(p), stream);
  });
  if (!direct) out.copy_(buf);
}

at::Tensor philox_cuda(const at::Tensor& counters, int64_t seed) {
  TORCH_CHECK_TYPE(counters.scalar_type() == at::kInt, "philox4x32_10: counters must be int32");
  TORCH_CHECK_VALUE(counters.dim() == 2 && counters.size(1) == 4,
                    "philox4x32_10: counters must have shape (N, 4), got ", counters.sizes());
  const c10::cuda::CUDAGuard guard(counters.device());
  const at::Tensor c = counters.contiguous();
  at::Tensor out = at::empty_like(c);
  const uint64_t us = static_cast<uint64_t>(seed);
  launch_philox(reinterpret_cast<const uint32_t*>(c.data_ptr<int32_t>()),
                reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), c.size(0),
                static_cast<uint32_t>(us), static_cast<uint32_t>(us >> 32),
                c10::cuda::getCurrentCUDAStream());
  return out;
}

}  // namespace
}  // namespace lori::cuda

TORCH_LIBRARY_IMPL(lori, CUDA, m) {
  m.impl("_random_a_fill", &lori::cuda::random_a_fill_cuda);
  m.impl("philox4x32_10", &lori::cuda::philox_cuda);
  m.impl("sparse_delta", &lori::cuda::sparse_delta_cuda);
  m.impl("sparse_delta_fwd", &lori::cuda::sparse_delta_fwd_cuda);
  m.impl("sparse_delta_backward", &lori::cuda::sparse_delta_backward_cuda);
  m.impl("merge_delta_", &lori::cuda::merge_delta_cuda);
  m.impl("shrink", &lori::cuda::shrink_cuda);
  m.impl("shrink_backward", &lori::cuda::shrink_backward_cuda);
  m.impl("expand", &lori::cuda::expand_cuda);
  m.impl("expand_backward", &lori::cuda::expand_backward_cuda);
}

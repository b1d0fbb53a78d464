// Host-side argument checks shared by every backend (CPU and CUDA host code).
// Errors name the argument; nothing here reads tensor data, so it is cheap and device-agnostic.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <string_view>

namespace lori {

// Seed and distribution resolved into what the kernels use (docs/spec_a.md).
struct AGenParams {
  uint32_t k0 = 0, k1 = 0;  // Philox key = (seed low 32, seed high 32)
  int dist = 0;             // lori::Distribution
  float magnitude = 0.f;    // fp32 |A| bound (uniform) or value (Rademacher)
  int64_t in_features = 0;  // of the whole A (the bound depends on it)
};

struct DeltaShape {
  int64_t tokens = 0;        // T: x.numel() / in_features
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t rank = 0;
  int64_t words = 0;         // mask words per row
  AGenParams gen;
};

int parse_distribution(std::string_view distribution);
AGenParams make_agen(int64_t seed, int64_t in_features, std::string_view distribution);

// Checks x/mask/values/offsets/rank/distribution for sparse_delta and its backward:
// dtypes, dims, shapes, and that every tensor is on `device` (x's device).
DeltaShape check_sparse_delta_args(const char* op, const at::Tensor& x, const at::Tensor& mask,
                                   const at::Tensor& values, const at::Tensor& offsets,
                                   int64_t rank, int64_t seed, std::string_view distribution);

// merge_delta_'s checks: weight (out_features, in_features) with weight's dtype for values,
// plus everything check_sparse_delta_args checks. Shared by the CPU and CUDA kernels.
DeltaShape check_merge_delta_args(const char* op, const at::Tensor& weight, const at::Tensor& mask,
                                  const at::Tensor& values, const at::Tensor& offsets,
                                  int64_t rank, int64_t seed, std::string_view distribution);

void check_grad_y(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                  const DeltaShape& s);

// sparse_delta_backward's optional h (sparse_delta_fwd's x @ A^T): undefined when absent or
// empty, else checked to be (T, rank) in the accumulation dtype (fp64 for fp64 x, else fp32)
// on x's device.
at::Tensor checked_saved_h(const char* op, const std::optional<at::Tensor>& h,
                           const at::Tensor& x, const DeltaShape& s);

}  // namespace lori

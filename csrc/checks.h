// Host-side argument checks shared by every backend (CPU and CUDA host code) and every op
// (sparse_delta & co. below, the batched ops in batched_checks.h). Each rule is written once,
// in the helpers at the top; errors name the argument. Nothing here reads tensor data, so it
// is cheap and device-agnostic.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string_view>

namespace lori {

// ---- the rules --------------------------------------------------------------------------
// rank in [1, kMaxRank].
void check_rank(const char* op, int64_t rank);
// x: at least 1-D (..., in_features), float32 / bfloat16 / float16 / float64.
void check_x(const char* op, const at::Tensor& x);
// in_features in [1, 2^31) (Philox counters address columns in 32 bits).
void check_in_features(const char* op, int64_t in_features);
// t is on x's device; `hint` ends the message (how to fix it). Applies to every tensor
// argument: a meta tensor mixed with real ones is an error, not a call to compute.
void check_same_device(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& x, const char* hint = "");
// t's dtype is `want`.
void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want);
// values' dtype is x's.
void check_values_dtype(const char* op, const at::Tensor& values, const at::Tensor& x);
// grad_y / base: x's device and dtype, shape (*x.shape[:-1], out_features).
void check_out_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                    int64_t out_features);
// scale: finite, and representable in the accumulation dtype (float64 for float64 inputs,
// else float32, where |scale| must be 0 or within float32's normal range): the kernels
// multiply in that dtype, so a scale outside it would turn into inf, 0 or a denormal silently.
void check_scale(const char* op, double scale, at::ScalarType dtype);
// The accumulation dtype of an input dtype.
inline at::ScalarType acc_dtype_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- sparse_delta & co. -------------------------------------------------------------------
// Seed and distribution resolved into what the kernels use (docs/spec_a.md).
struct AGenParams {
  uint32_t k0 = 0, k1 = 0;  // Philox key = (seed low 32, seed high 32)
  int dist = 0;             // lori::Distribution
  float magnitude = 0.f;    // fp32 |A| bound (uniform) or value (Rademacher)
  int64_t in_features = 0;  // of the whole A (the bound depends on it)
  // A's column of the kernel's column 0: x (or a merged weight) holds the column window
  // [col0, col0 + width) of A, and kernels address A's columns as col0 + their own column.
  int64_t col0 = 0;
};

struct DeltaShape {
  int64_t tokens = 0;        // T: x.numel() / in_features
  int64_t in_features = 0;   // x's width: the window's, not the whole A's (that is gen's)
  int64_t out_features = 0;
  int64_t rank = 0;
  int64_t words = 0;         // mask words per row
  AGenParams gen;
};

int parse_distribution(std::string_view distribution);
AGenParams make_agen(int64_t seed, int64_t in_features, std::string_view distribution);

// The column window [col_start, col_start + width) of an A `in_features` wide (-1: width, the
// unsharded call). Returns the whole A's in_features; errors name col_start / in_features.
int64_t check_window(const char* op, int64_t col_start, int64_t width, int64_t in_features);

// Checks x/mask/values/offsets/rank/distribution/scale for sparse_delta and its backward:
// dtypes, dims, shapes, scale, and that every tensor is on `device` (x's device).
DeltaShape check_sparse_delta_args(const char* op, const at::Tensor& x, const at::Tensor& mask,
                                   const at::Tensor& values, const at::Tensor& offsets,
                                   int64_t rank, int64_t seed, std::string_view distribution,
                                   double scale, int64_t col_start = 0,
                                   int64_t in_features = -1);

// merge_delta_'s checks: weight (out_features, in_features) with weight's dtype for values,
// plus everything check_sparse_delta_args checks. Shared by the CPU and CUDA kernels. With a
// window, weight is the column shard W[:, col_start:col_start + weight.size(1)].
DeltaShape check_merge_delta_args(const char* op, const at::Tensor& weight, const at::Tensor& mask,
                                  const at::Tensor& values, const at::Tensor& offsets,
                                  int64_t rank, int64_t seed, std::string_view distribution,
                                  double scale, int64_t col_start = 0,
                                  int64_t in_features = -1);

// shrink: x (..., width) float; returns the shape with out_features = 0, words = 0.
DeltaShape check_shrink_args(const char* op, const at::Tensor& x, int64_t rank, int64_t seed,
                             std::string_view distribution, int64_t col_start,
                             int64_t in_features);

// shrink_backward: grad_h (..., rank) in the accumulation dtype of `dtype` (x's, a float
// dtype), width = x's last dimension. Returns the shape of the shrink it differentiates.
DeltaShape check_shrink_backward_args(const char* op, const at::Tensor& grad_h, int64_t width,
                                      at::ScalarType dtype, int64_t rank, int64_t seed,
                                      std::string_view distribution, int64_t col_start,
                                      int64_t in_features);

// expand / expand_backward: h (..., rank) in the accumulation dtype of values' dtype (fp64 for
// fp64 values, else fp32), B = (mask, values, offsets) for that rank, on h's device. Returns the
// shape (tokens = h.numel() / rank, in_features = 0, no generator).
DeltaShape check_expand_args(const char* op, const at::Tensor& h, const at::Tensor& mask,
                             const at::Tensor& values, const at::Tensor& offsets, double scale);
// grad_y of expand_backward: on h's device, values' dtype, shape (..., out_features).
void check_expand_grad_y(const char* op, const at::Tensor& grad_y, const at::Tensor& h,
                         const at::Tensor& values, const DeltaShape& s);

void check_grad_y(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                  const DeltaShape& s);

// sparse_delta_backward's optional h (sparse_delta_fwd's x @ A^T): undefined when absent or
// empty, else checked to be (T, rank) in the accumulation dtype (fp64 for fp64 x, else fp32)
// on x's device. Even an empty h must be on x's device.
at::Tensor checked_saved_h(const char* op, const std::optional<at::Tensor>& h,
                           const at::Tensor& x, const DeltaShape& s);

}  // namespace lori

// Host-side argument checks of batched_sparse_delta (and its backward), for every backend,
// built from the shared rules of checks.h. Shapes, dtypes and devices only: nothing here
// reads tensor data. The CPU kernels also
// range-check adapter ids and each used adapter's value extent (csrc/cpu/batched_delta.h).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace lori {

// The pool's tensors (N adapters sharing rank, in_features and out_features):
//   masks (N, out, W) int32, values (total,), value_starts (N,) int64,
//   offsets (N, C + 1) int32 (relative to the adapter's value start), seeds (N,) int64,
//   scales (N,) fp32, distributions (N,) int32 (1 rademacher, 2 uniform).
struct BatchedShape {
  int64_t tokens = 0, in_features = 0, out_features = 0, rank = 0, words = 0, chunks = 0;
  int64_t adapters = 0;  // N
};

BatchedShape check_batched_args(const char* op, const at::Tensor& x, const at::Tensor& ids,
                                const at::Tensor& masks, const at::Tensor& values,
                                const at::Tensor& value_starts, const at::Tensor& offsets,
                                const at::Tensor& seeds, const at::Tensor& scales,
                                const at::Tensor& distributions, int64_t rank);

// base / grad_y: same device and dtype as x, shape (*x.shape[:-1], out_features).
void check_batched_out_like(const char* op, const char* name, const at::Tensor& t,
                            const at::Tensor& x, const BatchedShape& s);

// One used adapter's metadata, read from the pool's tensors (shared by the CPU and CUDA
// backends so both raise the same errors, in this order): offsets[a, 0] == 0, its value
// extent [value_start, value_start + nnz) within [0, num_values) (nnz = offsets[a, C]),
// distribution 1 or 2, and a finite scale. Overflow-safe.
void check_batched_adapter(const char* op, int64_t adapter, int32_t offset0, int64_t nnz,
                           int64_t value_start, int64_t num_values, int32_t distribution,
                           float scale);

// The error for adapter_ids[t] = id outside [-1, adapters).
[[noreturn]] void fail_batched_id(const char* op, int64_t t, int64_t id, int64_t adapters);

// ---- the optional plan of a batched call (built once per step by AdapterPool.plan) ---------
// The tokens grouped by adapter, precomputed so that a layer's call neither groups nor checks
// the ids (docs/architecture.md, "The batched plan"):
//   plan_order (T,) int32      a stable argsort of adapter_ids (-1 tokens first): the token of
//                              each sorted position
//   plan_starts (G + 1,) int32 group g's tokens are plan_order[starts[g], starts[g + 1]);
//                              starts[0] = 0, starts[G] = T, strictly increasing
//   plan_adapters (G,) int32   group g's adapter id, strictly increasing, in [-1, N)
// i.e. the run-length encoding of the sorted ids: given adapter_ids, the plan is unique.
struct BatchedPlan {
  at::Tensor order, starts, adapters;
  bool given = false;
};

// Shapes, dtypes and devices of the plan (all three or none given); reads no data.
BatchedPlan check_batched_plan(const char* op, const std::optional<at::Tensor>& order,
                               const std::optional<at::Tensor>& starts,
                               const std::optional<at::Tensor>& adapters, const at::Tensor& x,
                               const BatchedShape& s);

// The plan's bounds on host copies (what a kernel needs to stay in memory): starts from 0 to
// T strictly increasing, adapters strictly increasing in [-1, N). `order`'s entries are
// range-checked by the caller as it reads them.
void check_plan_bounds(const char* op, const int32_t* starts, const int32_t* adapters,
                       int64_t groups, int64_t tokens, int64_t n_adapters);

// Validation "full": the plan checked against adapter_ids (reads both back to the host): ids
// in range, bounds as above, order a permutation, every token in its adapter's group, stably
// ordered. Raises ValueError naming the first disagreement.
void verify_batched_plan(const char* op, const at::Tensor& ids, const BatchedPlan& plan,
                         int64_t n_adapters);

// lori_kernels.validation's level as the C++ side reads it (LORI_VALIDATE, kept in step by
// set_validation): 0 off, 1 on, 2 full.
int validation_level();

}  // namespace lori

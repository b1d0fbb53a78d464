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

}  // namespace lori

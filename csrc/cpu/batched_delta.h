// Pieces shared by the CPU forward and backward of batched_sparse_delta: grouping tokens by
// adapter (counting sort, stable) and the host-side checks of the adapters a batch uses.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../batched_checks.h"
#include "../checks.h"

namespace lori::cpu {

// One used adapter: its tokens are perm[start, start + len).
struct Segment {
  int64_t adapter = 0, start = 0, len = 0;
  int64_t value_start = 0, nnz = 0;  // the adapter's extent in the values buffer
  AGenParams gen;
  float scale = 0.f;
  // First token index when perm[start, start + len) is a run of consecutive tokens, else -1:
  // then x's rows are a view (no gather).
  int64_t contiguous_from = -1;
};

struct Grouping {
  std::vector<int64_t> perm;  // token indices, stably sorted by id (segments index into it)
  std::vector<Segment> segs;  // in adapter order
  std::vector<int64_t> idle;  // tokens with id -1
};

// Reads ids (range-checked: -1 <= id < N) and, for each adapter the batch uses, its seed,
// scale, distribution and value extent (value_start >= 0, offsets[a, 0] == 0,
// value_start + offsets[a, C] <= values.numel()). Per-chunk offsets are checked against the
// mask in the kernels, before any value is read.
Grouping group_tokens(const char* op, const at::Tensor& ids, const at::Tensor& value_starts,
                      const at::Tensor& offsets, const at::Tensor& seeds,
                      const at::Tensor& scales, const at::Tensor& distributions,
                      int64_t num_values, const BatchedShape& s);

// The same grouping from a plan (batched_checks.h: BatchedPlan), without reading the ids: the
// plan's bounds are checked (so no kernel leaves x or y), and each used adapter's metadata as
// above. Validation "full" first verifies the plan against the ids.
Grouping group_from_plan(const char* op, const at::Tensor& ids, const BatchedPlan& plan,
                         const at::Tensor& value_starts, const at::Tensor& offsets,
                         const at::Tensor& seeds, const at::Tensor& scales,
                         const at::Tensor& distributions, int64_t num_values,
                         const BatchedShape& s);

const char* distribution_name(int dist);
std::string adapter_op(const char* op, int64_t adapter);  // "op (adapter a)" for messages

}  // namespace lori::cpu

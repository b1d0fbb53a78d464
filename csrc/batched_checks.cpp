#include "batched_checks.h"

#include "checks.h"

#include <c10/util/Exception.h>

#include <cmath>

#include "lori/bitmask.h"
#include "lori/philox.h"

namespace lori {

BatchedShape check_batched_args(const char* op, const at::Tensor& x, const at::Tensor& ids,
                                const at::Tensor& masks, const at::Tensor& values,
                                const at::Tensor& value_starts, const at::Tensor& offsets,
                                const at::Tensor& seeds, const at::Tensor& scales,
                                const at::Tensor& distributions, int64_t rank) {
  check_rank(op, rank);
  check_x(op, x);
  const char* hint = "; move the pool (AdapterPool.to) and the ids to x's device";
  check_same_device(op, "adapter_ids", ids, x, hint);
  check_same_device(op, "masks", masks, x, hint);
  check_same_device(op, "values", values, x, hint);
  check_same_device(op, "value_starts", value_starts, x, hint);
  check_same_device(op, "offsets", offsets, x, hint);
  check_same_device(op, "seeds", seeds, x, hint);
  check_same_device(op, "scales", scales, x, hint);
  check_same_device(op, "distributions", distributions, x, hint);
  BatchedShape s;
  s.in_features = x.size(-1);
  check_in_features(op, s.in_features);
  s.tokens = x.numel() / s.in_features;
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op,
                   ": adapter_ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == s.tokens, op,
                    ": adapter_ids must have shape (", s.tokens, ",) (one id per token of x), got ",
                    ids.sizes());
  const int words = mask_words(static_cast<int>(rank));
  check_dtype(op, "masks", masks, at::kInt);
  TORCH_CHECK_VALUE(masks.dim() == 3 && masks.size(2) == words, op,
                    ": masks must have shape (adapters, out_features, ", words, ") for rank ", rank,
                    " (every adapter of a pool has the same rank), got ", masks.sizes());
  s.adapters = masks.size(0);
  s.out_features = masks.size(1);
  s.rank = rank;
  s.words = words;
  s.chunks = num_chunks(s.out_features);
  check_values_dtype(op, values, x);
  TORCH_CHECK_VALUE(values.dim() == 1, op, ": values must be 1-D, got ", values.sizes());
  check_dtype(op, "offsets", offsets, at::kInt);
  TORCH_CHECK_VALUE(offsets.dim() == 2 && offsets.size(0) == s.adapters &&
                        offsets.size(1) == s.chunks + 1,
                    op, ": offsets must have shape (", s.adapters, ", ", s.chunks + 1,
                    ") for out_features ", s.out_features, ", got ", offsets.sizes());
  auto per_adapter = [&](const at::Tensor& t, at::ScalarType want, const char* name) {
    check_dtype(op, name, t, want);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == s.adapters, op, ": ", name,
                      " must have shape (", s.adapters, ",) (one per adapter), got ", t.sizes());
  };
  per_adapter(value_starts, at::kLong, "value_starts");
  per_adapter(seeds, at::kLong, "seeds");
  per_adapter(scales, at::kFloat, "scales");
  per_adapter(distributions, at::kInt, "distributions");
  return s;
}

void check_batched_out_like(const char* op, const char* name, const at::Tensor& t,
                            const at::Tensor& x, const BatchedShape& s) {
  check_out_like(op, name, t, x, s.out_features);
}

void check_batched_adapter(const char* op, int64_t a, int32_t offset0, int64_t nnz,
                           int64_t value_start, int64_t num_values, int32_t dist, float scale) {
  TORCH_CHECK_VALUE(offset0 == 0, op, ": offsets[", a, ", 0] must be 0, got ", offset0);
  // Written so no sum can overflow: value_start + nnz could wrap past int64.
  TORCH_CHECK_VALUE(value_start >= 0 && nnz >= 0 && nnz <= num_values &&
                        value_start <= num_values - nnz,
                    op, ": adapter ", a, "'s values [", value_start, ", ", value_start + nnz,
                    ") do not lie within the values buffer (", num_values, " entries)");
  TORCH_CHECK_VALUE(dist == kRademacher || dist == kUniform, op, ": distributions[", a, "] = ",
                    dist, " is not 1 (rademacher) or 2 (uniform)");
  // scales is float32, so only finiteness is left to check (an inf scale turns a zero delta
  // into NaN).
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scales[", a, "] = ", scale,
                    " is not finite");
}

void fail_batched_id(const char* op, int64_t t, int64_t id, int64_t n) {
  TORCH_CHECK_VALUE(false, op, ": adapter_ids[", t, "] = ", id,
                    " is out of range for a pool of ", n, " adapters (valid: -1 for none, 0..",
                    n - 1, ")");
}

}  // namespace lori

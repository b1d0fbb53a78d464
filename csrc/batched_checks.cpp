#include "batched_checks.h"

#include <c10/util/Exception.h>

#include "lori/bitmask.h"
#include "lori/philox.h"

namespace lori {

BatchedShape check_batched_args(const char* op, const at::Tensor& x, const at::Tensor& ids,
                                const at::Tensor& masks, const at::Tensor& values,
                                const at::Tensor& value_starts, const at::Tensor& offsets,
                                const at::Tensor& seeds, const at::Tensor& scales,
                                const at::Tensor& distributions, int64_t rank) {
  TORCH_CHECK_VALUE(rank >= 1 && rank <= kMaxRank, op, ": rank must be in [1, ", kMaxRank,
                    "], got ", rank);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension (..., in_features)");
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf || xt == at::kDouble,
                   op, ": x must be float32, bfloat16, float16 or float64, got ", xt);
  const auto dev = x.device();
  auto same_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == dev, op, ": ", name, " is on ", t.device(), " but x is on ", dev,
                "; move the pool (AdapterPool.to) and the ids to x's device");
  };
  same_device(ids, "adapter_ids");
  same_device(masks, "masks");
  same_device(values, "values");
  same_device(value_starts, "value_starts");
  same_device(offsets, "offsets");
  same_device(seeds, "seeds");
  same_device(scales, "scales");
  same_device(distributions, "distributions");
  BatchedShape s;
  s.in_features = x.size(-1);
  TORCH_CHECK_VALUE(s.in_features >= 1 && s.in_features <= UINT32_MAX / 2, op,
                    ": in_features must be in [1, 2^31), got ", s.in_features);
  s.tokens = x.numel() / s.in_features;
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op,
                   ": adapter_ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.size(0) == s.tokens, op,
                    ": adapter_ids must have shape (", s.tokens, ",) (one id per token of x), got ",
                    ids.sizes());
  const int words = mask_words(static_cast<int>(rank));
  TORCH_CHECK_TYPE(masks.scalar_type() == at::kInt, op, ": masks must be int32, got ",
                   masks.scalar_type());
  TORCH_CHECK_VALUE(masks.dim() == 3 && masks.size(2) == words, op,
                    ": masks must have shape (adapters, out_features, ", words, ") for rank ", rank,
                    " (every adapter of a pool has the same rank), got ", masks.sizes());
  s.adapters = masks.size(0);
  s.out_features = masks.size(1);
  s.rank = rank;
  s.words = words;
  s.chunks = num_chunks(s.out_features);
  TORCH_CHECK_TYPE(values.scalar_type() == xt, op, ": values dtype (", values.scalar_type(),
                   ") must match x dtype (", xt, ")");
  TORCH_CHECK_VALUE(values.dim() == 1, op, ": values must be 1-D, got ", values.sizes());
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kInt, op, ": offsets must be int32, got ",
                   offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 2 && offsets.size(0) == s.adapters &&
                        offsets.size(1) == s.chunks + 1,
                    op, ": offsets must have shape (", s.adapters, ", ", s.chunks + 1,
                    ") for out_features ", s.out_features, ", got ", offsets.sizes());
  auto per_adapter = [&](const at::Tensor& t, at::ScalarType want, const char* name) {
    TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": ", name, " must be ", want, ", got ",
                     t.scalar_type());
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
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype (",
                   t.scalar_type(), ") must match x dtype (", x.scalar_type(), ")");
  auto expect = x.sizes().vec();
  expect.back() = s.out_features;
  TORCH_CHECK_VALUE(t.sizes().vec() == expect, op, ": ", name, " must have shape ",
                    c10::IntArrayRef(expect), ", got ", t.sizes());
}

void check_batched_adapter(const char* op, int64_t a, int32_t offset0, int64_t nnz,
                           int64_t value_start, int64_t num_values, int32_t dist) {
  TORCH_CHECK_VALUE(offset0 == 0, op, ": offsets[", a, ", 0] must be 0, got ", offset0);
  // Written so no sum can overflow: value_start + nnz could wrap past int64.
  TORCH_CHECK_VALUE(value_start >= 0 && nnz >= 0 && nnz <= num_values &&
                        value_start <= num_values - nnz,
                    op, ": adapter ", a, "'s values [", value_start, ", ", value_start + nnz,
                    ") do not lie within the values buffer (", num_values, " entries)");
  TORCH_CHECK_VALUE(dist == kRademacher || dist == kUniform, op, ": distributions[", a, "] = ",
                    dist, " is not 1 (rademacher) or 2 (uniform)");
}

void fail_batched_id(const char* op, int64_t t, int64_t id, int64_t n) {
  TORCH_CHECK_VALUE(false, op, ": adapter_ids[", t, "] = ", id,
                    " is out of range for a pool of ", n, " adapters (valid: -1 for none, 0..",
                    n - 1, ")");
}

}  // namespace lori

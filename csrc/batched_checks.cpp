#include "batched_checks.h"

#include "checks.h"

#include <c10/util/Exception.h>

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <string_view>
#include <vector>

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

BatchedPlan check_batched_plan(const char* op, const std::optional<at::Tensor>& order,
                               const std::optional<at::Tensor>& starts,
                               const std::optional<at::Tensor>& adapters, const at::Tensor& x,
                               const BatchedShape& s) {
  const bool o = order.has_value() && order->defined();
  const bool st = starts.has_value() && starts->defined();
  const bool a = adapters.has_value() && adapters->defined();
  BatchedPlan p;
  if (!o && !st && !a) return p;
  TORCH_CHECK_VALUE(o && st && a, op,
                    ": plan_order, plan_starts and plan_adapters go together (give all three "
                    "or none)");
  const char* hint = "; build the plan on x's device (AdapterPool.plan)";
  check_same_device(op, "plan_order", *order, x, hint);
  check_same_device(op, "plan_starts", *starts, x, hint);
  check_same_device(op, "plan_adapters", *adapters, x, hint);
  check_dtype(op, "plan_order", *order, at::kInt);
  check_dtype(op, "plan_starts", *starts, at::kInt);
  check_dtype(op, "plan_adapters", *adapters, at::kInt);
  TORCH_CHECK_VALUE(order->dim() == 1 && order->size(0) == s.tokens, op,
                    ": plan_order must have shape (", s.tokens, ",) (one entry per token of x), "
                    "got ", order->sizes());
  TORCH_CHECK_VALUE(adapters->dim() == 1, op, ": plan_adapters must be 1-D, got ",
                    adapters->sizes());
  const int64_t G = adapters->size(0);
  TORCH_CHECK_VALUE(starts->dim() == 1 && starts->size(0) == G + 1, op,
                    ": plan_starts must have shape (", G + 1, ",) (one more than plan_adapters), "
                    "got ", starts->sizes());
  p.order = *order;
  p.starts = *starts;
  p.adapters = *adapters;
  p.given = true;
  return p;
}

void check_plan_bounds(const char* op, const int32_t* starts, const int32_t* adapters,
                       int64_t G, int64_t T, int64_t N) {
  TORCH_CHECK_VALUE(starts[0] == 0 && starts[G] == T, op,
                    ": plan_starts must run from 0 to the token count ", T, ", got ", starts[0],
                    " .. ", starts[G]);
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK_VALUE(starts[g] < starts[g + 1], op,
                      ": plan_starts must be strictly increasing (no empty group), got "
                      "plan_starts[", g, "] = ", starts[g], " and plan_starts[", g + 1, "] = ",
                      starts[g + 1]);
    TORCH_CHECK_VALUE(adapters[g] >= -1 && adapters[g] < N, op, ": plan_adapters[", g, "] = ",
                      adapters[g], " is out of range for a pool of ", N,
                      " adapters (valid: -1 for none, 0..", N - 1, ")");
    TORCH_CHECK_VALUE(g == 0 || adapters[g - 1] < adapters[g], op,
                      ": plan_adapters must be strictly increasing (one group per adapter), got "
                      "plan_adapters[", g - 1, "] = ", adapters[g - 1], " and plan_adapters[", g,
                      "] = ", adapters[g]);
  }
}

void verify_batched_plan(const char* op, const at::Tensor& ids, const BatchedPlan& plan,
                         int64_t N) {
  const at::Tensor id = ids.cpu().to(at::kLong).contiguous();
  const at::Tensor order = plan.order.cpu().contiguous();
  const at::Tensor starts = plan.starts.cpu().contiguous();
  const at::Tensor adapters = plan.adapters.cpu().contiguous();
  const int64_t T = id.numel(), G = adapters.numel();
  const int64_t* idp = id.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    if (idp[t] < -1 || idp[t] >= N) fail_batched_id(op, t, idp[t], N);
  }
  const int32_t* op_ = order.data_ptr<int32_t>();
  const int32_t* sp = starts.data_ptr<int32_t>();
  const int32_t* ap = adapters.data_ptr<int32_t>();
  check_plan_bounds(op, sp, ap, G, T, N);
  std::vector<char> seen(static_cast<size_t>(T), 0);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t p = sp[g]; p < sp[g + 1]; ++p) {
      const int64_t t = op_[p];
      TORCH_CHECK_VALUE(t >= 0 && t < T && !seen[t], op, ": plan_order is not a permutation of "
                        "the ", T, " tokens (plan_order[", p, "] = ", t, ")");
      seen[t] = 1;
      TORCH_CHECK_VALUE(idp[t] == ap[g], op, ": the plan does not match adapter_ids: token ",
                        t, " (plan_order[", p, "]) is in the group of adapter ", ap[g],
                        " but adapter_ids[", t, "] = ", idp[t]);
      TORCH_CHECK_VALUE(p == sp[g] || op_[p - 1] < t, op,
                        ": plan_order is not a stable sort of adapter_ids (plan_order[", p - 1,
                        "] = ", op_[p - 1], " before plan_order[", p, "] = ", t,
                        " in one group)");
    }
  }
}

int validation_level() {
  const char* env = std::getenv("LORI_VALIDATE");
  if (env == nullptr) return 1;
  const std::string_view v(env);
  if (v == "0" || v == "off") return 0;
  if (v == "full") return 2;
  return 1;
}

}  // namespace lori

#include "checks.h"

#include <c10/util/Exception.h>

#include "lori/bitmask.h"
#include "lori/philox.h"

namespace lori {

int parse_distribution(std::string_view distribution) {
  if (distribution == "rademacher") return kRademacher;
  if (distribution == "uniform") return kUniform;
  TORCH_CHECK_VALUE(false, "distribution must be 'rademacher' or 'uniform', got '",
                    std::string(distribution), "'");
}

AGenParams make_agen(int64_t seed, int64_t in_features, std::string_view distribution) {
  AGenParams g;
  const uint64_t useed = static_cast<uint64_t>(seed);  // int64 carries the uint64 bit pattern
  g.k0 = static_cast<uint32_t>(useed);
  g.k1 = static_cast<uint32_t>(useed >> 32);
  g.dist = parse_distribution(distribution);
  TORCH_CHECK_VALUE(in_features >= 1 && in_features <= UINT32_MAX / 2,
                    "in_features must be in [1, 2^31), got ", in_features);
  g.in_features = in_features;
  g.magnitude = a_magnitude(g.dist, in_features);
  return g;
}

static bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

DeltaShape check_sparse_delta_args(const char* op, const at::Tensor& x, const at::Tensor& mask,
                                   const at::Tensor& values, const at::Tensor& offsets,
                                   int64_t rank, int64_t seed, std::string_view distribution) {
  TORCH_CHECK_VALUE(rank >= 1 && rank <= kMaxRank, op, ": rank must be in [1, ", kMaxRank,
                    "], got ", rank);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension (..., in_features)");
  TORCH_CHECK_TYPE(is_float_dtype(x.scalar_type()), op,
                   ": x must be float32, bfloat16, float16 or float64, got ", x.scalar_type());
  const auto dev = x.device();
  auto same_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == dev, op, ": ", name, " is on ", t.device(),
                " but x is on ", dev, "; move them to the same device");
  };
  same_device(mask, "mask");
  same_device(values, "values");
  same_device(offsets, "offsets");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kInt, op, ": mask must be int32, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(1) == mask_words(static_cast<int>(rank)), op,
                    ": mask must have shape (out_features, ", mask_words(static_cast<int>(rank)),
                    ") for rank ", rank, ", got ", mask.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), op,
                   ": values dtype (", values.scalar_type(), ") must match x dtype (",
                   x.scalar_type(), ")");
  TORCH_CHECK_VALUE(values.dim() == 1, op, ": values must be 1-D (nnz,), got ",
                    values.sizes());
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kInt, op, ": offsets must be int32, got ",
                   offsets.scalar_type());
  const int64_t out = mask.size(0);
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == num_chunks(out) + 1, op,
                    ": offsets must have shape (", num_chunks(out) + 1,
                    ",) for out_features ", out, ", got ", offsets.sizes());
  TORCH_CHECK_VALUE(values.numel() <= out * rank, op, ": values has ", values.numel(),
                    " entries, more than out_features * rank = ", out * rank);
  DeltaShape s;
  s.in_features = x.size(-1);
  s.tokens = s.in_features == 0 ? 0 : x.numel() / s.in_features;
  s.out_features = out;
  s.rank = rank;
  s.words = mask.size(1);
  s.gen = make_agen(seed, s.in_features, distribution);
  return s;
}

DeltaShape check_merge_delta_args(const char* op, const at::Tensor& weight, const at::Tensor& mask,
                                  const at::Tensor& values, const at::Tensor& offsets,
                                  int64_t rank, int64_t seed, std::string_view distribution) {
  TORCH_CHECK_VALUE(weight.dim() == 2, op,
                    ": weight must be 2-D (out_features, in_features), got ", weight.sizes());
  // weight stands in for x: its rows are "tokens" of in_features, its dtype is values'.
  const DeltaShape s = check_sparse_delta_args(op, weight, mask, values, offsets, rank, seed,
                                               distribution);
  TORCH_CHECK_VALUE(weight.size(0) == s.out_features, op, ": weight has ", weight.size(0),
                    " rows but mask has out_features = ", s.out_features);
  return s;
}

void check_grad_y(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                  const DeltaShape& s) {
  TORCH_CHECK(grad_y.device() == x.device(), op, ": grad_y is on ", grad_y.device(),
              " but x is on ", x.device());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y dtype (",
                   grad_y.scalar_type(), ") must match x dtype (", x.scalar_type(), ")");
  auto expect = x.sizes().vec();
  expect.back() = s.out_features;
  TORCH_CHECK_VALUE(grad_y.sizes().vec() == expect, op, ": grad_y must have shape ",
                    c10::IntArrayRef(expect), ", got ", grad_y.sizes());
}

at::Tensor checked_saved_h(const char* op, const std::optional<at::Tensor>& h,
                           const at::Tensor& x, const DeltaShape& s) {
  if (!h.has_value() || !h->defined() || h->numel() == 0) return at::Tensor();
  const auto hdt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(h->dim() == 2 && h->size(0) == s.tokens && h->size(1) == s.rank &&
                        h->scalar_type() == hdt && h->device() == x.device(),
                    op, ": h must be (", s.tokens, ", ", s.rank, ") ", hdt,
                    " on x's device, got ", h->sizes(), " ", h->scalar_type());
  return *h;
}

}  // namespace lori

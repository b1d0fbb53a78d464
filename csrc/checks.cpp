#include "checks.h"

#include <c10/util/Exception.h>

#include <cfloat>
#include <cmath>

#include "lori/bitmask.h"
#include "lori/philox.h"

namespace lori {

namespace {

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    default: return c10::toString(t);
  }
}

}  // namespace

// ---- the rules --------------------------------------------------------------------------

void check_rank(const char* op, int64_t rank) {
  TORCH_CHECK_VALUE(rank >= 1 && rank <= kMaxRank, op, ": rank must be in [1, ", kMaxRank,
                    "], got ", rank);
}

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension (..., in_features)");
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble,
                   op, ": x must be float32, bfloat16, float16 or float64, got ", t);
}

void check_in_features(const char* op, int64_t in_features) {
  TORCH_CHECK_VALUE(in_features >= 1 && in_features <= UINT32_MAX / 2, op,
                    op[0] ? ": " : "", "in_features must be in [1, 2^31), got ", in_features);
}

void check_same_device(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& x, const char* hint) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device(), hint);
}

void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": ", name, " must be ", dtype_name(want),
                   ", got ", t.scalar_type());
}

void check_values_dtype(const char* op, const at::Tensor& values, const at::Tensor& x) {
  TORCH_CHECK_TYPE(values.scalar_type() == x.scalar_type(), op, ": values dtype (",
                   values.scalar_type(), ") must match x dtype (", x.scalar_type(), ")");
}

void check_out_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                    int64_t out_features) {
  check_same_device(op, name, t, x);
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype (",
                   t.scalar_type(), ") must match x dtype (", x.scalar_type(), ")");
  auto expect = x.sizes().vec();
  expect.back() = out_features;
  TORCH_CHECK_VALUE(t.sizes().vec() == expect, op, ": ", name, " must have shape ",
                    c10::IntArrayRef(expect), ", got ", t.sizes());
}

void check_scale(const char* op, double scale, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  if (acc_dtype_of(dtype) == at::kDouble || scale == 0.0) return;
  const double a = std::fabs(scale);
  TORCH_CHECK_VALUE(a >= static_cast<double>(FLT_MIN) && a <= static_cast<double>(FLT_MAX), op,
                    ": scale = ", scale, " is not representable in float32, the accumulation ",
                    "dtype for ", dtype_name(dtype), " inputs (|scale| must be 0 or in [",
                    FLT_MIN, ", ", FLT_MAX, "])");
}

// ---- sparse_delta & co. -------------------------------------------------------------------

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
  check_in_features("", in_features);
  g.in_features = in_features;
  g.magnitude = a_magnitude(g.dist, in_features);
  return g;
}

int64_t check_window(const char* op, int64_t col_start, int64_t width, int64_t in_features) {
  TORCH_CHECK_VALUE(in_features == -1 || in_features >= 1, op,
                    ": in_features must be >= 1 (A's full width), or -1 for x's width; got ",
                    in_features);
  const int64_t n = in_features == -1 ? width : in_features;
  check_in_features(op, n);
  TORCH_CHECK_VALUE(col_start >= 0, op, ": col_start must be >= 0, got ", col_start);
  TORCH_CHECK_VALUE(col_start <= n - width, op, ": col_start + width = ", col_start, " + ",
                    width, " exceeds in_features = ", n, " (x holds A's columns [col_start, ",
                    "col_start + x.size(-1)))");
  return n;
}

namespace {

// B = (mask, values, offsets) for rank, values in `vt`'s dtype, all on `t`'s device (named
// xn in messages). Returns out_features.
int64_t check_packed_b(const char* op, const at::Tensor& t, const char* xn,
                       const at::Tensor& mask, const at::Tensor& values,
                       const at::Tensor& offsets, int64_t rank, at::ScalarType vt) {
  const char* hint = "; move them to the same device";
  check_same_device(op, "mask", mask, t, hint);
  check_same_device(op, "values", values, t, hint);
  check_same_device(op, "offsets", offsets, t, hint);
  check_dtype(op, "mask", mask, at::kInt);
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(1) == mask_words(static_cast<int>(rank)), op,
                    ": mask must have shape (out_features, ", mask_words(static_cast<int>(rank)),
                    ") for rank ", rank, ", got ", mask.sizes());
  TORCH_CHECK_TYPE(values.scalar_type() == vt, op, ": values dtype (", values.scalar_type(),
                   ") must match ", xn, " dtype (", vt, ")");
  TORCH_CHECK_VALUE(values.dim() == 1, op, ": values must be 1-D (nnz,), got ",
                    values.sizes());
  check_dtype(op, "offsets", offsets, at::kInt);
  const int64_t out = mask.size(0);
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == num_chunks(out) + 1, op,
                    ": offsets must have shape (", num_chunks(out) + 1,
                    ",) for out_features ", out, ", got ", offsets.sizes());
  TORCH_CHECK_VALUE(values.numel() <= out * rank, op, ": values has ", values.numel(),
                    " entries, more than out_features * rank = ", out * rank);
  return out;
}

}  // namespace

DeltaShape check_shrink_args(const char* op, const at::Tensor& x, int64_t rank, int64_t seed,
                             std::string_view distribution, int64_t col_start,
                             int64_t in_features) {
  check_rank(op, rank);
  check_x(op, x);
  check_in_features(op, x.size(-1));
  DeltaShape s;
  s.in_features = x.size(-1);
  s.tokens = x.numel() / s.in_features;
  s.rank = rank;
  s.gen = make_agen(seed, check_window(op, col_start, s.in_features, in_features), distribution);
  s.gen.col0 = col_start;
  return s;
}

DeltaShape check_shrink_backward_args(const char* op, const at::Tensor& grad_h, int64_t width,
                                      at::ScalarType dtype, int64_t rank, int64_t seed,
                                      std::string_view distribution, int64_t col_start,
                                      int64_t in_features) {
  check_rank(op, rank);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
                       dtype == at::kDouble,
                   op, ": dtype must be float32, bfloat16, float16 or float64, got ", dtype);
  check_in_features(op, width);
  TORCH_CHECK_VALUE(grad_h.dim() >= 1 && grad_h.size(-1) == rank, op,
                    ": grad_h must have shape (..., rank = ", rank, "), got ", grad_h.sizes());
  check_dtype(op, "grad_h", grad_h, acc_dtype_of(dtype));
  DeltaShape s;
  s.in_features = width;
  s.tokens = grad_h.numel() / rank;
  s.rank = rank;
  s.gen = make_agen(seed, check_window(op, col_start, width, in_features), distribution);
  s.gen.col0 = col_start;
  return s;
}

DeltaShape check_expand_args(const char* op, const at::Tensor& h, const at::Tensor& mask,
                             const at::Tensor& values, const at::Tensor& offsets, double scale) {
  TORCH_CHECK_VALUE(h.dim() >= 1, op, ": h must have at least 1 dimension (..., rank)");
  const int64_t rank = h.size(-1);
  check_rank(op, rank);
  const auto vt = values.scalar_type();
  TORCH_CHECK_TYPE(vt == at::kFloat || vt == at::kBFloat16 || vt == at::kHalf || vt == at::kDouble,
                   op, ": values must be float32, bfloat16, float16 or float64, got ", vt);
  TORCH_CHECK_TYPE(h.scalar_type() == acc_dtype_of(vt), op, ": h must be ",
                   dtype_name(acc_dtype_of(vt)), " (the accumulation dtype of ", dtype_name(vt),
                   " values), got ", h.scalar_type());
  DeltaShape s;
  s.out_features = check_packed_b(op, h, "the output", mask, values, offsets, rank, vt);
  check_scale(op, scale, vt);
  s.rank = rank;
  s.tokens = h.numel() / rank;
  s.words = mask.size(1);
  return s;
}

void check_expand_grad_y(const char* op, const at::Tensor& grad_y, const at::Tensor& h,
                         const at::Tensor& values, const DeltaShape& s) {
  auto y_shape = h.sizes().vec();
  y_shape.back() = s.out_features;
  TORCH_CHECK(grad_y.device() == h.device(), op, ": grad_y is on ", grad_y.device(),
              " but h is on ", h.device());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == values.scalar_type(), op, ": grad_y dtype (",
                   grad_y.scalar_type(), ") must match values dtype (", values.scalar_type(),
                   ")");
  TORCH_CHECK_VALUE(grad_y.sizes().vec() == y_shape, op, ": grad_y must have shape ",
                    c10::IntArrayRef(y_shape), ", got ", grad_y.sizes());
}

DeltaShape check_sparse_delta_args(const char* op, const at::Tensor& x, const at::Tensor& mask,
                                   const at::Tensor& values, const at::Tensor& offsets,
                                   int64_t rank, int64_t seed, std::string_view distribution,
                                   double scale, int64_t col_start, int64_t in_features) {
  check_rank(op, rank);
  check_x(op, x);
  const int64_t out = check_packed_b(op, x, "x", mask, values, offsets, rank, x.scalar_type());
  check_scale(op, scale, x.scalar_type());
  DeltaShape s;
  s.in_features = x.size(-1);
  s.tokens = s.in_features == 0 ? 0 : x.numel() / s.in_features;
  s.out_features = out;
  s.rank = rank;
  s.words = mask.size(1);
  check_in_features(op, s.in_features);
  s.gen = make_agen(seed, check_window(op, col_start, s.in_features, in_features), distribution);
  s.gen.col0 = col_start;
  return s;
}

DeltaShape check_merge_delta_args(const char* op, const at::Tensor& weight, const at::Tensor& mask,
                                  const at::Tensor& values, const at::Tensor& offsets,
                                  int64_t rank, int64_t seed, std::string_view distribution,
                                  double scale, int64_t col_start, int64_t in_features) {
  TORCH_CHECK_VALUE(weight.dim() == 2, op,
                    ": weight must be 2-D (out_features, in_features), got ", weight.sizes());
  // weight stands in for x: its rows are "tokens" of in_features, its dtype is values'. Its
  // dtype rules are checked here first so their errors name the argument the caller passed.
  const auto t = weight.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble,
                   op, ": weight must be float32, bfloat16, float16 or float64, got ", t);
  TORCH_CHECK_TYPE(values.scalar_type() == t, op, ": values dtype (", values.scalar_type(),
                   ") must match weight dtype (", t, ")");
  const DeltaShape s = check_sparse_delta_args(op, weight, mask, values, offsets, rank, seed,
                                               distribution, scale, col_start, in_features);
  TORCH_CHECK_VALUE(weight.size(0) == s.out_features, op, ": weight has ", weight.size(0),
                    " rows but mask has out_features = ", s.out_features);
  return s;
}

void check_grad_y(const char* op, const at::Tensor& grad_y, const at::Tensor& x,
                  const DeltaShape& s) {
  check_out_like(op, "grad_y", grad_y, x, s.out_features);
}

at::Tensor checked_saved_h(const char* op, const std::optional<at::Tensor>& h,
                           const at::Tensor& x, const DeltaShape& s) {
  if (!h.has_value() || !h->defined()) return at::Tensor();
  check_same_device(op, "h", *h, x);
  if (h->numel() == 0) return at::Tensor();
  const auto hdt = acc_dtype_of(x.scalar_type());
  TORCH_CHECK_VALUE(h->dim() == 2 && h->size(0) == s.tokens && h->size(1) == s.rank &&
                        h->scalar_type() == hdt,
                    op, ": h must be (", s.tokens, ", ", s.rank, ") ", hdt,
                    " on x's device, got ", h->sizes(), " ", h->scalar_type());
  return *h;
}

}  // namespace lori

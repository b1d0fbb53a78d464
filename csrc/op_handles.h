// Typed dispatcher handles for calling lori ops from C++ (autograd, batched paths), so a call
// goes through the dispatcher (and so reaches the right backend) without repeating the types.
// The ops that read A end in (col_start, in_features); the call wrappers default them to the
// unsharded call (0, -1), so callers without a column window pass neither.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace lori {

namespace detail {

inline const auto& sparse_delta_handle() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lori::sparse_delta", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, int64_t, int64_t, c10::string_view, double,
                            int64_t, int64_t)>();
  return op;
}

inline const auto& sparse_delta_backward_handle() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lori::sparse_delta_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, int64_t, int64_t, c10::string_view, double, bool, bool,
              const std::optional<at::Tensor>&, int64_t, int64_t)>();
  return op;
}

inline const auto& sparse_delta_fwd_handle() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lori::sparse_delta_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              int64_t, int64_t, c10::string_view, double, int64_t, int64_t)>();
  return op;
}

struct SparseDeltaCall {
  at::Tensor call(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& values,
                  const at::Tensor& offsets, int64_t rank, int64_t seed,
                  c10::string_view distribution, double scale, int64_t col_start = 0,
                  int64_t in_features = -1) const {
    return sparse_delta_handle().call(x, mask, values, offsets, rank, seed, distribution, scale,
                                      col_start, in_features);
  }
};

struct SparseDeltaFwdCall {
  std::tuple<at::Tensor, at::Tensor> call(const at::Tensor& x, const at::Tensor& mask,
                                          const at::Tensor& values, const at::Tensor& offsets,
                                          int64_t rank, int64_t seed,
                                          c10::string_view distribution, double scale,
                                          int64_t col_start = 0,
                                          int64_t in_features = -1) const {
    return sparse_delta_fwd_handle().call(x, mask, values, offsets, rank, seed, distribution,
                                          scale, col_start, in_features);
  }
};

struct SparseDeltaBackwardCall {
  std::tuple<at::Tensor, at::Tensor> call(const at::Tensor& grad_y, const at::Tensor& x,
                                          const at::Tensor& mask, const at::Tensor& values,
                                          const at::Tensor& offsets, int64_t rank, int64_t seed,
                                          c10::string_view distribution, double scale,
                                          bool need_x, bool need_values,
                                          const std::optional<at::Tensor>& h,
                                          int64_t col_start = 0,
                                          int64_t in_features = -1) const {
    return sparse_delta_backward_handle().call(grad_y, x, mask, values, offsets, rank, seed,
                                               distribution, scale, need_x, need_values, h,
                                               col_start, in_features);
  }
};

}  // namespace detail

inline detail::SparseDeltaCall sparse_delta_op() { return {}; }
inline detail::SparseDeltaFwdCall sparse_delta_fwd_op() { return {}; }
inline detail::SparseDeltaBackwardCall sparse_delta_backward_op() { return {}; }

inline const auto& shrink_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lori::shrink", "")
                             .typed<at::Tensor(const at::Tensor&, int64_t, int64_t,
                                               c10::string_view, int64_t, int64_t)>();
  return op;
}

inline const auto& shrink_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lori::shrink_backward", "")
          .typed<at::Tensor(const at::Tensor&, int64_t, at::ScalarType, int64_t, int64_t,
                            c10::string_view, int64_t, int64_t)>();
  return op;
}

inline const auto& expand_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lori::expand", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double)>();
  return op;
}

inline const auto& expand_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lori::expand_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, double, bool, bool)>();
  return op;
}

}  // namespace lori

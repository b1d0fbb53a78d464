// Typed dispatcher handles for calling lori ops from C++ (autograd, batched paths), so a call
// goes through the dispatcher (and so reaches the right backend) without repeating the types.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace lori {

inline const auto& sparse_delta_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lori::sparse_delta", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, int64_t, int64_t, c10::string_view, double)>();
  return op;
}

inline const auto& sparse_delta_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lori::sparse_delta_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, int64_t, int64_t, c10::string_view, double, bool, bool,
              const std::optional<at::Tensor>&)>();
  return op;
}

inline const auto& sparse_delta_fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lori::sparse_delta_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              int64_t, int64_t, c10::string_view, double)>();
  return op;
}

}  // namespace lori

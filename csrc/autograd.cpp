// Autograd for sparse_delta, shrink and expand, in C++: a Python autograd kernel costs ~6 us
// per call, a quarter of a decode step's budget. Gradients flow to x (h for expand) and to
// B's packed values only (A is frozen); the backwards are registered ops
// (lori::sparse_delta_backward, shrink_backward, expand_backward), so torch.compile traces
// them like any other op.
//
// Every tensor a backward reads is saved with save_for_backward (h included), never in
// saved_data: only then do torch.autograd.graph.saved_tensors_hooks (activation offload,
// checkpointing) see it.
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_handles.h"

namespace lori {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class SparseDelta : public torch::autograd::Function<SparseDelta> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mask,
                            const at::Tensor& values, const at::Tensor& offsets, int64_t rank,
                            int64_t seed, c10::string_view distribution, double scale,
                            int64_t col_start, int64_t in_features) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["rank"] = rank;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["distribution"] = std::string(distribution);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["col_start"] = col_start;
    ctx->saved_data["in_features"] = in_features;
    if (values.requires_grad() && (x.is_cpu() || x.is_cuda())) {  // both have sparse_delta_fwd
      // grad_values needs h = x @ A^T; the forward has it, so keep it (T x rank: small)
      // instead of recomputing a GEMM in the backward.
      auto [y, h] = sparse_delta_fwd_op().call(x, mask, values, offsets, rank, seed,
                                               distribution, scale, col_start, in_features);
      ctx->save_for_backward({x, mask, values, offsets, h});
      return y;
    }
    ctx->save_for_backward({x, mask, values, offsets, at::Tensor()});
    return sparse_delta_op().call(x, mask, values, offsets, rank, seed, distribution, scale,
                                  col_start, in_features);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0), need_values = ctx->needs_input_grad(2);
    at::Tensor gx, gv;
    if (need_x || need_values) {
      const std::optional<at::Tensor> h =
          saved[4].defined() ? std::optional<at::Tensor>(saved[4]) : std::nullopt;
      std::tie(gx, gv) = sparse_delta_backward_op().call(
          grad_outputs[0].contiguous(), saved[0], saved[1], saved[2], saved[3],
          ctx->saved_data["rank"].toInt(), ctx->saved_data["seed"].toInt(),
          ctx->saved_data["distribution"].toStringRef(), ctx->saved_data["scale"].toDouble(),
          need_x, need_values, h, ctx->saved_data["col_start"].toInt(),
          ctx->saved_data["in_features"].toInt());
    }
    return {need_x ? gx : at::Tensor(), at::Tensor(), need_values ? gv : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor sparse_delta_autograd(const at::Tensor& x, const at::Tensor& mask,
                                 const at::Tensor& values, const at::Tensor& offsets,
                                 int64_t rank, int64_t seed, c10::string_view distribution,
                                 double scale, int64_t col_start, int64_t in_features) {
  // Inference (no input needs a gradient): skip building an autograd node; a decode step is
  // tens of microseconds, and Function::apply's bookkeeping is a few of them.
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || values.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return sparse_delta_op().call(x, mask, values, offsets, rank, seed, distribution, scale,
                                  col_start, in_features);
  }
  return SparseDelta::apply(x, mask, values, offsets, rank, seed, distribution, scale,
                            col_start, in_features);
}

// h = x @ A_window^T: x's gradient is grad_h @ A_window; nothing is saved but scalars (A is
// regenerated, x is not needed).
class Shrink : public torch::autograd::Function<Shrink> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t rank,
                            int64_t seed, c10::string_view distribution, int64_t col_start,
                            int64_t in_features) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->saved_data["width"] = x.size(-1);
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["rank"] = rank;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["distribution"] = std::string(distribution);
    ctx->saved_data["col_start"] = col_start;
    ctx->saved_data["in_features"] = in_features;
    return shrink_op().call(x, rank, seed, distribution, col_start, in_features);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor gx = shrink_backward_op().call(
        grad_outputs[0].contiguous(), ctx->saved_data["width"].toInt(),
        static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt()),
        ctx->saved_data["rank"].toInt(), ctx->saved_data["seed"].toInt(),
        ctx->saved_data["distribution"].toStringRef(), ctx->saved_data["col_start"].toInt(),
        ctx->saved_data["in_features"].toInt());
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor shrink_autograd(const at::Tensor& x, int64_t rank, int64_t seed,
                           c10::string_view distribution, int64_t col_start,
                           int64_t in_features) {
  if (!at::GradMode::is_enabled() || !x.requires_grad()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return shrink_op().call(x, rank, seed, distribution, col_start, in_features);
  }
  return Shrink::apply(x, rank, seed, distribution, col_start, in_features);
}

// y = scale * h @ B^T: gradients to h and to values.
class Expand : public torch::autograd::Function<Expand> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& mask,
                            const at::Tensor& values, const at::Tensor& offsets, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({h, mask, values, offsets});
    ctx->saved_data["scale"] = scale;
    return expand_op().call(h, mask, values, offsets, scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const bool need_h = ctx->needs_input_grad(0), need_values = ctx->needs_input_grad(2);
    at::Tensor gh, gv;
    if (need_h || need_values) {
      std::tie(gh, gv) = expand_backward_op().call(
          grad_outputs[0].contiguous(), saved[0], saved[1], saved[2], saved[3],
          ctx->saved_data["scale"].toDouble(), need_h, need_values);
    }
    return {need_h ? gh : at::Tensor(), at::Tensor(), need_values ? gv : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor expand_autograd(const at::Tensor& h, const at::Tensor& mask, const at::Tensor& values,
                           const at::Tensor& offsets, double scale) {
  if (!at::GradMode::is_enabled() || !(h.requires_grad() || values.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return expand_op().call(h, mask, values, offsets, scale);
  }
  return Expand::apply(h, mask, values, offsets, scale);
}

}  // namespace
}  // namespace lori

TORCH_LIBRARY_IMPL(lori, Autograd, m) {
  m.impl("sparse_delta", &lori::sparse_delta_autograd);
  m.impl("shrink", &lori::shrink_autograd);
  m.impl("expand", &lori::expand_autograd);
}

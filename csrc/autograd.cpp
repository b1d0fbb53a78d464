// Autograd for sparse_delta, in C++: a Python autograd kernel costs ~6 us per call, a
// quarter of a decode step's budget. Gradients flow to x and to B's packed values only (A is
// frozen); the backward is the registered op lori::sparse_delta_backward, so torch.compile
// traces it like any other op.
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_handles.h"

namespace lori {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> saved_h(AutogradContext* ctx) {
  const at::Tensor h = ctx->saved_data["h"].toTensor();
  return h.defined() ? std::optional<at::Tensor>(h) : std::nullopt;
}

class SparseDelta : public torch::autograd::Function<SparseDelta> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mask,
                            const at::Tensor& values, const at::Tensor& offsets, int64_t rank,
                            int64_t seed, c10::string_view distribution, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, mask, values, offsets});
    ctx->saved_data["rank"] = rank;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["distribution"] = std::string(distribution);
    ctx->saved_data["scale"] = scale;
    if (values.requires_grad() && (x.is_cpu() || x.is_cuda())) {  // both have sparse_delta_fwd
      // grad_values needs h = x @ A^T; the forward has it, so keep it (T x rank: small)
      // instead of recomputing a GEMM in the backward.
      auto [y, h] = sparse_delta_fwd_op().call(x, mask, values, offsets, rank, seed,
                                               distribution, scale);
      ctx->saved_data["h"] = h;
      return y;
    }
    ctx->saved_data["h"] = at::Tensor();
    return sparse_delta_op().call(x, mask, values, offsets, rank, seed, distribution, scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const bool need_x = ctx->needs_input_grad(0), need_values = ctx->needs_input_grad(2);
    at::Tensor gx, gv;
    if (need_x || need_values) {
      std::tie(gx, gv) = sparse_delta_backward_op().call(
          grad_outputs[0].contiguous(), saved[0], saved[1], saved[2], saved[3],
          ctx->saved_data["rank"].toInt(), ctx->saved_data["seed"].toInt(),
          ctx->saved_data["distribution"].toStringRef(), ctx->saved_data["scale"].toDouble(),
          need_x, need_values, saved_h(ctx));
    }
    return {need_x ? gx : at::Tensor(), at::Tensor(), need_values ? gv : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor sparse_delta_autograd(const at::Tensor& x, const at::Tensor& mask,
                                 const at::Tensor& values, const at::Tensor& offsets,
                                 int64_t rank, int64_t seed, c10::string_view distribution,
                                 double scale) {
  // Inference (no input needs a gradient): skip building an autograd node; a decode step is
  // tens of microseconds, and Function::apply's bookkeeping is a few of them.
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || values.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return sparse_delta_op().call(x, mask, values, offsets, rank, seed, distribution, scale);
  }
  return SparseDelta::apply(x, mask, values, offsets, rank, seed, distribution, scale);
}

}  // namespace
}  // namespace lori

TORCH_LIBRARY_IMPL(lori, Autograd, m) {
  m.impl("sparse_delta", &lori::sparse_delta_autograd);
}

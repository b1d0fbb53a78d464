// Autograd for batched_sparse_delta, in C++ (as csrc/autograd.cpp does for sparse_delta: a
// Python autograd kernel costs ~6 us per call). Gradients flow to x, to the pool's values
// buffer (each used adapter's B entries) and to base (grad_y itself); A is frozen, and the
// ids, masks, offsets, seeds, scales and distributions are not differentiable. The backward
// is the registered op lori::batched_sparse_delta_backward, so torch.compile traces it.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace lori {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
using BwdSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, int64_t, bool, bool, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class BatchedSparseDelta : public torch::autograd::Function<BatchedSparseDelta> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& ids,
                            const at::Tensor& masks, const at::Tensor& values,
                            const at::Tensor& value_starts, const at::Tensor& offsets,
                            const at::Tensor& seeds, const at::Tensor& scales,
                            const at::Tensor& distributions, int64_t rank,
                            const std::optional<at::Tensor>& base,
                            const std::optional<at::Tensor>& plan_order,
                            const std::optional<at::Tensor>& plan_starts,
                            const std::optional<at::Tensor>& plan_adapters) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // The plan goes to the backward with the ids (undefined tensors when none was given).
    ctx->save_for_backward({x, ids, masks, values, value_starts, offsets, seeds, scales,
                            distributions, plan_order.value_or(at::Tensor()),
                            plan_starts.value_or(at::Tensor()),
                            plan_adapters.value_or(at::Tensor())});
    ctx->saved_data["rank"] = rank;
    ctx->saved_data["has_base"] = base.has_value() && base->defined();
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lori::batched_sparse_delta", "")
                         .typed<FwdSig>();
    return op.call(x, ids, masks, values, value_starts, offsets, seeds, scales, distributions,
                   rank, base, plan_order, plan_starts, plan_adapters);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto sv = ctx->get_saved_variables();
    // needs_input_grad counts tensor inputs only: x 0, values 3, base 9 (when given).
    const bool need_x = ctx->needs_input_grad(0), need_values = ctx->needs_input_grad(3);
    const bool has_base = ctx->saved_data["has_base"].toBool();
    const bool need_base = has_base && ctx->needs_input_grad(9);
    at::Tensor gx, gv;
    if (need_x || need_values) {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("lori::batched_sparse_delta_backward", "")
                           .typed<BwdSig>();
      std::tie(gx, gv) = op.call(grad_outputs[0].contiguous(), sv[0], sv[1], sv[2], sv[3],
                                 sv[4], sv[5], sv[6], sv[7], sv[8],
                                 ctx->saved_data["rank"].toInt(), need_x, need_values,
                                 opt(sv[9]), opt(sv[10]), opt(sv[11]));
    }
    return {need_x ? gx : at::Tensor(), at::Tensor(), at::Tensor(),
            need_values ? gv : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), need_base ? grad_outputs[0] : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor batched_sparse_delta_autograd(const at::Tensor& x, const at::Tensor& ids,
                                         const at::Tensor& masks, const at::Tensor& values,
                                         const at::Tensor& value_starts,
                                         const at::Tensor& offsets, const at::Tensor& seeds,
                                         const at::Tensor& scales,
                                         const at::Tensor& distributions, int64_t rank,
                                         const std::optional<at::Tensor>& base,
                                         const std::optional<at::Tensor>& plan_order,
                                         const std::optional<at::Tensor>& plan_starts,
                                         const std::optional<at::Tensor>& plan_adapters) {
  return BatchedSparseDelta::apply(x, ids, masks, values, value_starts, offsets, seeds, scales,
                                   distributions, rank, base, plan_order, plan_starts,
                                   plan_adapters);
}

}  // namespace
}  // namespace lori

TORCH_LIBRARY_IMPL(lori, Autograd, m) {
  m.impl("batched_sparse_delta", &lori::batched_sparse_delta_autograd);
}

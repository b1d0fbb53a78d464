// CPU backward of batched_sparse_delta: tokens grouped by adapter as in the forward (or taken
// from the plan), then
// each segment is one call of the single-adapter backward (lori::sparse_delta_backward,
// through the dispatcher) on the segment's rows:
//   grad_x[t]                  = scales[a] * (grad_y[t] @ B_a) @ A_a         (0 where a == -1)
//   grad_values[extent of a]   = scales[a] * (grad_y[seg]^T @ h[seg]) on a's mask
// so every adapter in the batch gets its B gradient (multi-task training in one batch);
// values outside the used adapters' extents get 0.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../op_handles.h"
#include "batched_delta.h"

namespace lori::cpu {
namespace {

// Whether two used adapters' value extents overlap (a pool may alias one B for several ids).
bool shares_values(const std::vector<Segment>& segs) {
  std::vector<std::pair<int64_t, int64_t>> ext;
  for (const Segment& seg : segs) {
    if (seg.nnz > 0) ext.emplace_back(seg.value_start, seg.value_start + seg.nnz);
  }
  std::sort(ext.begin(), ext.end());
  for (size_t i = 1; i < ext.size(); ++i) {
    if (ext[i].first < ext[i - 1].second) return true;
  }
  return false;
}

at::Tensor rows(const at::Tensor& t2, const at::Tensor& perm, const Segment& seg) {
  if (seg.contiguous_from >= 0) return t2.narrow(0, seg.contiguous_from, seg.len);
  return t2.index_select(0, perm.narrow(0, seg.start, seg.len));
}

std::tuple<at::Tensor, at::Tensor> batched_sparse_delta_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& ids, const at::Tensor& masks,
    const at::Tensor& values, const at::Tensor& value_starts, const at::Tensor& offsets,
    const at::Tensor& seeds, const at::Tensor& scales, const at::Tensor& distributions,
    int64_t rank, bool need_x, bool need_values, const std::optional<at::Tensor>& plan_order,
    const std::optional<at::Tensor>& plan_starts, const std::optional<at::Tensor>& plan_adapters) {
  const char* op = "batched_sparse_delta_backward";
  const BatchedShape s = check_batched_args(op, x, ids, masks, values, value_starts, offsets,
                                            seeds, scales, distributions, rank);
  check_batched_out_like(op, "grad_y", grad_y, x, s);
  const BatchedPlan plan = check_batched_plan(op, plan_order, plan_starts, plan_adapters, x, s);
  const Grouping g =
      plan.given ? group_from_plan(op, ids, plan, value_starts, offsets, seeds, scales,
                                   distributions, values.numel(), s)
                 : group_tokens(op, ids, value_starts, offsets, seeds, scales, distributions,
                                values.numel(), s);
  at::Tensor gx = need_x ? at::zeros(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor gv = need_values ? at::zeros_like(values, at::MemoryFormat::Contiguous)
                              : at::empty({0}, values.options());
  const int64_t T = s.tokens;
  if (T == 0 || s.out_features == 0 || g.segs.empty() || (!need_x && !need_values)) {
    return {gx, gv};
  }
  at::AutoDispatchBelowADInplaceOrView guard;  // the per-segment calls record no graph
  // Adapters sharing a value range sum their gradients there. In bf16/fp16 that sum must be
  // formed in fp32 and rounded once: the segments then run in fp32 (bf16/fp16 -> fp32 is
  // exact, and the kernels compute in fp32 either way) and grad_x / grad_values are rounded
  // once at the end.
  const bool lowp = values.scalar_type() != acc_dtype_of(values.scalar_type());
  const bool widen = lowp && need_values && shares_values(g.segs);
  const auto wide = [&](const at::Tensor& t) { return widen ? t.to(at::kFloat) : t; };
  const at::Tensor x2 = wide(x.reshape({T, s.in_features}));
  const at::Tensor gy2 = wide(grad_y.reshape({T, s.out_features}));
  const at::Tensor vals = wide(values);
  at::Tensor gv_acc = widen ? at::zeros({values.numel()}, values.options().dtype(at::kFloat)) : gv;
  at::Tensor gx2 = need_x ? gx.view({T, s.in_features}) : at::Tensor();
  const at::Tensor perm = at::from_blob(const_cast<int64_t*>(g.perm.data()),
                                        {static_cast<int64_t>(g.perm.size())}, at::kLong);
  for (const Segment& seg : g.segs) {
    const int64_t a = seg.adapter;
    at::Tensor gxs, gvs;
    try {
      std::tie(gxs, gvs) = sparse_delta_backward_op().call(
          rows(gy2, perm, seg).contiguous(), rows(x2, perm, seg), masks[a],
          vals.narrow(0, seg.value_start, seg.nnz), offsets[a], rank,
          static_cast<int64_t>(static_cast<uint64_t>(seg.gen.k0) |
                               (static_cast<uint64_t>(seg.gen.k1) << 32)),
          distribution_name(seg.gen.dist), seg.scale, need_x, need_values, std::nullopt);
    } catch (const c10::ValueError& e) {  // name the adapter
      TORCH_CHECK_VALUE(false, adapter_op(op, a), ": ", e.what_without_backtrace());
    }
    if (need_x) {
      if (widen) gxs = gxs.to(gx.scalar_type());  // rounded once
      if (seg.contiguous_from >= 0) {
        gx2.narrow(0, seg.contiguous_from, seg.len).copy_(gxs);
      } else {
        gx2.index_copy_(0, perm.narrow(0, seg.start, seg.len), gxs);
      }
    }
    // add_, not copy_: adapters may share a value range (then their gradients sum).
    if (need_values) gv_acc.narrow(0, seg.value_start, seg.nnz).add_(gvs);
  }
  if (widen) gv.copy_(gv_acc);
  return {gx, gv};
}

}  // namespace
}  // namespace lori::cpu

TORCH_LIBRARY_IMPL(lori, CPU, m) {
  m.impl("batched_sparse_delta_backward", &lori::cpu::batched_sparse_delta_backward_cpu);
}

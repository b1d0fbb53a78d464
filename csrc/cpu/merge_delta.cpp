// CPU merge_delta_: weight (out, in) += scale * B @ A, in place, A generated per column tile.
// Used by LoRI merge (scale) and unmerge (-scale). Computes in fp32 (float64 for float64
// weights) and rounds into the weight once per element.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "delta_common.h"

namespace lori::cpu {
namespace {

void merge_delta_cpu(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& values,
                     const at::Tensor& offsets, int64_t rank, int64_t seed,
                     c10::string_view distribution, double scale, int64_t col_start,
                     int64_t in_features) {
  const char* op = "merge_delta_";
  const DeltaShape s = check_merge_delta_args(op, weight, mask, values, offsets, rank, seed,
                                              distribution, scale, col_start, in_features);
  check_bitmask_cpu(op, mask, offsets, rank, values.numel());
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor b = dense_b(mask, values, rank, acc).mul_(scale);  // (out, rank)
  for_a_tiles(s, acc, [&](int64_t k0, int64_t kt, const at::Tensor& a) {
    at::Tensor w = weight.narrow(1, k0, kt);
    if (w.scalar_type() == acc) {
      w.addmm_(b, a);
    } else {
      w.copy_(at::addmm(w.to(acc), b, a));
    }
  });
}

}  // namespace
}  // namespace lori::cpu

TORCH_LIBRARY_IMPL(lori, CPU, m) { m.impl("merge_delta_", &lori::cpu::merge_delta_cpu); }

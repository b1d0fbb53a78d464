// Generic CPU path of sparse_delta (forward and backward): float64 inputs, and CPUs
// without AVX2. A is still generated tile by tile (gen_a_tile); B is expanded to a dense
// (out, rank) matrix, which is small next to x. Accumulates in the input dtype (float64
// for gradcheck) or fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "agen.h"
#include "delta_common.h"
#include "isa.h"

namespace lori::cpu {

bool use_generic_path(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble || cpu_paths().generic_ops;
}

namespace {

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor h_generic(const at::Tensor& xa, const DeltaShape& s) {
  at::Tensor h = at::zeros({xa.size(0), s.rank}, xa.options());
  for_a_tiles(s, xa.scalar_type(), [&](int64_t k0, int64_t kt, const at::Tensor& a) {
    h.addmm_(xa.narrow(1, k0, kt), a.t());
  });
  return h;
}

}  // namespace

at::Tensor shrink_generic(const at::Tensor& x2, const DeltaShape& s) {
  return h_generic(x2.to(acc_type(x2)), s);
}

at::Tensor shrink_backward_generic(const at::Tensor& gh, const DeltaShape& s,
                                   at::ScalarType dtype) {
  const auto acc = gh.scalar_type();
  at::Tensor gx = at::empty({gh.size(0), s.in_features}, gh.options().dtype(dtype));
  for_a_tiles(s, acc, [&](int64_t k0, int64_t kt, const at::Tensor& a) {
    gx.narrow(1, k0, kt).copy_(at::mm(gh, a));
  });
  return gx;
}

at::Tensor sparse_delta_generic(const at::Tensor& x2, const at::Tensor& mask,
                                const at::Tensor& values, const DeltaShape& s, double scale,
                                at::Tensor* h_out, bool acc_out) {
  const auto acc = acc_type(x2);
  const at::Tensor h = h_generic(x2.to(acc), s);
  if (h_out) *h_out = h;
  const at::Tensor y = at::mm(h, dense_b(mask, values, s.rank, acc).t()).mul_(scale);
  return acc_out ? y : y.to(x2.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> sparse_delta_backward_generic(
    const at::Tensor& gy2, const at::Tensor& x2, const at::Tensor& mask, const at::Tensor& values,
    const DeltaShape& s, double scale, bool need_x, bool need_values,
    const at::Tensor& h_saved) {
  const auto acc = acc_type(x2);
  const at::Tensor gy = gy2.to(acc), b = dense_b(mask, values, s.rank, acc);
  at::Tensor gx, gv;
  if (need_x) {
    const at::Tensor gh = at::mm(gy, b).mul_(scale);  // (T, rank)
    gx = at::empty({x2.size(0), s.in_features}, x2.options());
    for_a_tiles(s, acc, [&](int64_t k0, int64_t kt, const at::Tensor& a) {
      gx.narrow(1, k0, kt).copy_(at::mm(gh, a));
    });
  }
  if (need_values) {
    const at::Tensor h = h_saved.defined() ? h_saved.to(acc) : h_generic(x2.to(acc), s);
    const at::Tensor gb = at::mm(gy.t(), h).mul_(scale);  // (out, rank)
    const at::Tensor on_mask = dense_b(mask, at::ones_like(values, at::kDouble), s.rank,
                                       at::kDouble).to(at::kBool);
    gv = gb.masked_select(on_mask).to(values.scalar_type());
  }
  return {gx, gv};
}

}  // namespace lori::cpu

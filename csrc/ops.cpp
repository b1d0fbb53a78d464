// The op schemas, declared once. Backends (csrc/cpu, csrc/cuda) only register kernels.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/isa.h"
#include "lori/bitmask.h"
#include "lori/philox.h"

// `import lori_kernels._C` loads this .so (and so runs the registrations below); the
// module itself is empty: everything is reached through torch.ops.lori.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace lori {

// random_a allocates on the requested device and fills through the dispatcher, so each
// backend only implements _random_a_fill.
static at::Tensor random_a(int64_t seed, int64_t rank, int64_t in_features,
                           c10::string_view distribution, int64_t col_start, int64_t col_end,
                           std::optional<at::ScalarType> dtype, std::optional<at::Device> device) {
  TORCH_CHECK_VALUE(rank >= 0, "random_a: rank must be >= 0, got ", rank);
  TORCH_CHECK_VALUE(in_features >= 1, "random_a: in_features must be >= 1, got ", in_features);
  TORCH_CHECK_VALUE(col_end >= -1, "random_a: col_end must be >= 0, or -1 for in_features; got ",
                    col_end);
  if (col_end == -1) col_end = in_features;
  TORCH_CHECK_VALUE(0 <= col_start && col_start <= col_end && col_end <= in_features,
                    "random_a: columns [", col_start, ", ", col_end,
                    ") must lie within [0, in_features=", in_features, "]");
  const auto st = dtype.value_or(at::kFloat);
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf ||
                       st == at::kDouble,
                   "random_a: dtype must be float32, float64, bfloat16 or float16, got ", st);
  at::Tensor out = at::empty({rank, col_end - col_start},
                             at::TensorOptions().dtype(st).device(device.value_or(at::kCPU)));
  static auto fill = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lori::_random_a_fill", "")
                         .typed<void(const at::Tensor&, int64_t, int64_t, int64_t,
                                     c10::string_view)>();
  fill.call(out, seed, in_features, col_start, distribution);
  return out;
}

}  // namespace lori

TORCH_LIBRARY(lori, m) {
  // A (rank, in_features)[:, col_start:col_end] from the seed (docs/spec_a.md).
  m.def(
      "random_a(int seed, int rank, int in_features, str distribution=\"rademacher\", "
      "int col_start=0, int col_end=-1, *, ScalarType? dtype=None, Device? device=None) "
      "-> Tensor");
  // Backend entry of random_a: out[r, c] = A[r, col_start + c] for the whole of `out`.
  m.def(
      "_random_a_fill(Tensor(a!) out, int seed, int in_features, int col_start, "
      "str distribution) -> ()");
  // y = scale * (x @ A^T) @ B^T, A from (seed, distribution), B = (mask, values, offsets).
  // Column window (tensor parallelism): x holds A's columns [col_start, col_start + x.size(-1))
  // of an A `in_features` wide (-1: x's width), scaled and indexed as the whole A
  // (docs/spec_a.md), so the sum over column shards is the unsharded result. The same two
  // arguments, with the same meaning, end every op below that reads A.
  m.def(
      "sparse_delta(Tensor x, Tensor mask, Tensor values, Tensor offsets, int rank, int seed, "
      "str distribution, float scale, int col_start=0, int in_features=-1) -> Tensor");
  // sparse_delta that also returns h = x @ A^T (T, rank) in fp32 (float64 for float64 x), for
  // the backward to reuse (an empty h means the backend did not keep it).
  m.def(
      "sparse_delta_fwd(Tensor x, Tensor mask, Tensor values, Tensor offsets, int rank, int seed, "
      "str distribution, float scale, int col_start=0, int in_features=-1) -> (Tensor, Tensor)");
  // (grad_x, grad_values); each is an empty tensor when its need_* flag is false. h, when
  // given and non-empty, is sparse_delta_fwd's h (skips recomputing x @ A^T).
  m.def(
      "sparse_delta_backward(Tensor grad_y, Tensor x, Tensor mask, Tensor values, "
      "Tensor offsets, int rank, int seed, str distribution, float scale, bool need_x, "
      "bool need_values, Tensor? h=None, int col_start=0, int in_features=-1) -> (Tensor, Tensor)");
  // weight += scale * B @ A, in place, A generated per column tile (LoRI merge; unmerge
  // passes -scale). weight is (out_features, in_features), or with a window the column shard
  // W[:, col_start:col_start + weight.size(1)].
  m.def(
      "merge_delta_(Tensor(a!) weight, Tensor mask, Tensor values, Tensor offsets, int rank, "
      "int seed, str distribution, float scale, int col_start=0, int in_features=-1) -> ()");
  // The two stages of sparse_delta as ops of their own, so a row-parallel layer can all-reduce
  // h (T x rank) between them instead of y (T x out):
  //   shrink: h = x @ A_window^T, (..., rank) in fp32 (float64 for float64 x); no scale, so h
  //           is exactly sparse_delta_fwd's h and a sum of shards' h is the unsharded h.
  //   expand: y = scale * h @ B^T, (..., out_features) in values' dtype; h must be in the
  //           accumulation dtype of values' dtype. The scale is applied here, once.
  m.def(
      "shrink(Tensor x, int rank, int seed, str distribution, int col_start=0, "
      "int in_features=-1) -> Tensor");
  // grad_x = grad_h @ A_window, (..., width) in `dtype` (x's); grad_h (..., rank) as h.
  m.def(
      "shrink_backward(Tensor grad_h, int width, ScalarType dtype, int rank, int seed, "
      "str distribution, int col_start=0, int in_features=-1) -> Tensor");
  m.def("expand(Tensor h, Tensor mask, Tensor values, Tensor offsets, float scale) -> Tensor");
  // (grad_h = scale * grad_y @ B in h's dtype, grad_values = scale * sum_t grad_y[t, o] h[t, k]
  // per pattern entry); each is an empty tensor when its need_* flag is false.
  m.def(
      "expand_backward(Tensor grad_y, Tensor h, Tensor mask, Tensor values, Tensor offsets, "
      "float scale, bool need_h, bool need_values) -> (Tensor, Tensor)");
  // Triton backend of the ops above (same semantics, kernels in lori_kernels/triton,
  // registered from Python; on CPU tensors they run only under TRITON_INTERPRET=1).
  m.def(
      "triton_sparse_delta(Tensor x, Tensor mask, Tensor values, Tensor offsets, int rank, "
      "int seed, str distribution, float scale, int col_start=0, int in_features=-1) -> Tensor");
  m.def(
      "triton_sparse_delta_backward(Tensor grad_y, Tensor x, Tensor mask, Tensor values, "
      "Tensor offsets, int rank, int seed, str distribution, float scale, bool need_x, "
      "bool need_values, int col_start=0, int in_features=-1) -> (Tensor, Tensor)");
  m.def(
      "triton_random_a_fill(Tensor(a!) out, int seed, int in_features, int col_start, "
      "str distribution) -> ()");
  m.def(
      "triton_merge_delta_(Tensor(a!) weight, Tensor mask, Tensor values, Tensor offsets, "
      "int rank, int seed, str distribution, float scale, int col_start=0, "
      "int in_features=-1) -> ()");
  m.def(
      "triton_shrink(Tensor x, int rank, int seed, str distribution, int col_start=0, "
      "int in_features=-1) -> Tensor");
  m.def(
      "triton_shrink_backward(Tensor grad_h, int width, ScalarType dtype, int rank, int seed, "
      "str distribution, int col_start=0, int in_features=-1) -> Tensor");
  m.def(
      "triton_expand(Tensor h, Tensor mask, Tensor values, Tensor offsets, float scale) "
      "-> Tensor");
  m.def(
      "triton_expand_backward(Tensor grad_y, Tensor h, Tensor mask, Tensor values, "
      "Tensor offsets, float scale, bool need_h, bool need_values) -> (Tensor, Tensor)");
  // ---- batched multi-adapter ops: schemas below this line ---------------------------------
  // Many adapters of one pool (same rank, in_features, out_features) in one batch:
  //   y[t] = base[t] + scales[a] * (x[t] @ A_a^T) @ B_a^T,  a = adapter_ids[t]
  // (a == -1: y[t] = base[t], or 0 without base). A_a from (seeds[a], distributions[a]:
  // 1 rademacher, 2 uniform); B_a = (masks[a], values[value_starts[a] + offsets[a, :]],
  // offsets[a]) with offsets relative to the adapter's value start. x (..., in_features),
  // adapter_ids (T,) int32/int64 with T = x.numel() / in_features. `base` (x's dtype, shape
  // (..., out_features)) is the accumulate form: y = base + delta, rounded once.
  // The plan (all three or none; int32, on x's device), the tokens grouped by adapter once per
  // step instead of once per layer call:
  //   plan_order (T,)        stable argsort of adapter_ids (-1 tokens first)
  //   plan_starts (G + 1,)   group g = plan_order[starts[g], starts[g + 1]); 0 .. T, increasing
  //   plan_adapters (G,)     group g's id, strictly increasing, in [-1, N)
  // Given, the kernels use it and neither group nor check the ids; LORI_VALIDATE=full checks
  // it against adapter_ids (raises on any disagreement), "on" trusts it (AdapterPool.plan
  // builds it from the ids it validated) and checks only its bounds where a kernel needs them.
  m.def(
      "batched_sparse_delta(Tensor x, Tensor adapter_ids, Tensor masks, Tensor values, "
      "Tensor value_starts, Tensor offsets, Tensor seeds, Tensor scales, "
      "Tensor distributions, int rank, Tensor? base=None, Tensor? plan_order=None, "
      "Tensor? plan_starts=None, Tensor? plan_adapters=None) -> Tensor");
  // (grad_x, grad_values) of the delta; grad_values covers the whole values buffer (0 off
  // the used adapters). Each is an empty tensor when its need_* flag is false. The plan as in
  // the forward.
  m.def(
      "batched_sparse_delta_backward(Tensor grad_y, Tensor x, Tensor adapter_ids, "
      "Tensor masks, Tensor values, Tensor value_starts, Tensor offsets, Tensor seeds, "
      "Tensor scales, Tensor distributions, int rank, bool need_x, bool need_values, "
      "Tensor? plan_order=None, Tensor? plan_starts=None, Tensor? plan_adapters=None) "
      "-> (Tensor, Tensor)");
  // Triton backend of the two batched ops (same semantics; lori_kernels/triton).
  m.def(
      "triton_batched_sparse_delta(Tensor x, Tensor adapter_ids, Tensor masks, Tensor values, "
      "Tensor value_starts, Tensor offsets, Tensor seeds, Tensor scales, "
      "Tensor distributions, int rank, Tensor? base=None, Tensor? plan_order=None, "
      "Tensor? plan_starts=None, Tensor? plan_adapters=None) -> Tensor");
  m.def(
      "triton_batched_sparse_delta_backward(Tensor grad_y, Tensor x, Tensor adapter_ids, "
      "Tensor masks, Tensor values, Tensor value_starts, Tensor offsets, Tensor seeds, "
      "Tensor scales, Tensor distributions, int rank, bool need_x, bool need_values, "
      "Tensor? plan_order=None, Tensor? plan_starts=None, Tensor? plan_adapters=None) "
      "-> (Tensor, Tensor)");
  // ---- end of batched multi-adapter ops ----------------------------------------------
  // Philox4x32-10 blocks for int32 counters (N, 4) under a 64-bit seed: the spec's RNG
  // exposed for known-answer tests of the shared header.
  m.def("philox4x32_10(Tensor counters, int seed) -> Tensor");
  // Caps the CPU kernels' instruction set ("auto" | "avx512" | "avx2" | "generic"; "auto"
  // restores the best the CPU has) so tests run every vector path on one machine. Returns
  // the previous level.
  m.def("_set_cpu_isa(str isa) -> str", &lori::cpu::set_cpu_isa);
}

TORCH_LIBRARY_IMPL(lori, CompositeExplicitAutograd, m) {
  m.impl("random_a", &lori::random_a);
}

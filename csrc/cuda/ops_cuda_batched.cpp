// CUDA registrations of batched_sparse_delta and its backward: argument checks (shared with the
// CPU backend through batched_checks.h), token grouping and launch planning. Kernels are in
// batched_delta_fwd.cu / batched_delta_bwd.cu.
//
// Adapter ids and the pool's metadata live on the device. By default each call validates them
// the way the CPU backend does (ids in [-1, N); for each adapter a token uses: offsets[a, 0] ==
// 0, its value extent inside `values`, distribution 1 or 2, a finite scale), with the same
// error messages: one small kernel (and, for the scales, a few tensor ops) write flags that the
// host reads in one device-to-host copy of 56 bytes, after the tile plan is built. That copy synchronizes the host with the stream: it costs a round trip
// (~10-20 us) plus waiting for the work queued before the call, and so prevents CPU/GPU
// overlap. It also gives the host the exact tile and slot counts, so the grids and the
// backward's grad_values buffer are sized exactly.
// LORI_VALIDATE=off turns it off (no sync); it is also skipped while the stream is being
// captured into a CUDA graph. With a plan (plan_order / plan_starts / plan_adapters, built
// once per step by AdapterPool.plan) a call neither sorts nor validates: the tile list is
// built from the plan's groups on the device (their count G is the plan's shape, so the grids
// are sized without a sync), and nothing is read back. LORI_VALIDATE=full checks the plan
// against the ids on the host first (syncs) and then groups as without a plan. Unvalidated input stays memory-safe: ids outside [0, N) act as
// -1 (zero delta, zero gradient), value extents are clamped into `values`, and, as for
// sparse_delta, the kernels trust each chunk's offsets only within those bounds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "../batched_checks.h"
#include "host_common.h"
#include "kernels.cuh"
#include "lori/bitmask.h"
#include "lori/philox.h"

namespace lori::cuda {
namespace {

bool validation_enabled(cudaStream_t stream) {
  // The package's one validation switch (lori_kernels.validation keeps LORI_VALIDATE in step
  // with set_validation): "off" (or "0") skips the device-side checks and their host sync.
  const char* env = std::getenv("LORI_VALIDATE");
  if (env != nullptr && (std::string_view(env) == "0" || std::string_view(env) == "off")) {
    return false;
  }
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &st));
  return st == cudaStreamCaptureStatusNone;
}

// The pool's tensors made contiguous (kept alive here) and their device view.
struct PoolTensors {
  at::Tensor masks, offsets, value_starts, seeds, scales, dists;
  BatchedPool p{};
};

PoolTensors pool_view(const at::Tensor& masks, const at::Tensor& offsets,
                      const at::Tensor& value_starts, const at::Tensor& seeds,
                      const at::Tensor& scales, const at::Tensor& dists, int64_t num_values,
                      const BatchedShape& s) {
  PoolTensors t;
  t.masks = masks.contiguous();
  t.offsets = offsets.contiguous();
  t.value_starts = value_starts.contiguous();
  t.seeds = seeds.contiguous();
  t.scales = scales.contiguous();
  t.dists = dists.contiguous();
  BatchedPool& p = t.p;
  p.masks = reinterpret_cast<const uint32_t*>(t.masks.data_ptr<int32_t>());
  p.offsets = t.offsets.data_ptr<int32_t>();
  p.value_starts = t.value_starts.data_ptr<int64_t>();
  p.seeds = t.seeds.data_ptr<int64_t>();
  p.scales = t.scales.data_ptr<float>();
  p.dists = t.dists.data_ptr<int32_t>();
  p.adapters = s.adapters;
  p.out = s.out_features;
  p.chunks = s.chunks;
  p.num_values = num_values;
  p.words = static_cast<int>(s.words);
  p.rank = static_cast<int>(s.rank);
  p.mag_rademacher = a_magnitude(kRademacher, s.in_features);
  p.mag_uniform = a_magnitude(kUniform, s.in_features);
  return t;
}

// Tokens per tile of the shrink/expand kernels: 64 when every group averages more than 16
// tokens (prefill), else 16. T / min(T, N) is a lower bound of that average known without
// reading the ids.
int batched_tile(int64_t T, int64_t N, at::ScalarType t, int64_t rank) {
  if (t == at::kDouble || rank > kLargeTileMaxRank) return kSmallTile;  // shared-memory budget
  const int64_t groups = std::max<int64_t>(1, std::min(T, N));
  return T / groups > kSmallTile ? kLargeTile : kSmallTile;
}

struct Grouping {
  at::Tensor perm, tiles, tiles_gb;
  TilePlan plan{}, plan_gb{};
  int64_t grid = 0, grid_gb = 0;  // tile counts (exact when validated, else the bounds)
  int64_t slots_gb = 0;           // slots of plan_gb (exact when validated, else the bound)
};

// The tile plan(s) from a step's plan: perm = plan_order, tiles cut from its groups, no sort,
// no validation, no sync. Memory-safe whatever the plan holds (it is trusted for the
// grouping, "on"): token indices are clamped into [0, T), group bounds into [0, T] by the
// tile builder, and groups whose adapter is outside [0, N) act as "no adapter".
Grouping group_from_plan(const BatchedPlan& bp, const BatchedShape& s, int tile, int gb_tile,
                         cudaStream_t stream) {
  const int64_t T = s.tokens, N = s.adapters, G = bp.adapters.size(0);
  Grouping g;
  g.perm = bp.order.to(at::kLong).clamp_(0, T - 1);
  const at::Tensor starts = bp.starts.contiguous(), groups = bp.adapters.contiguous();
  auto build = [&](int tl, at::Tensor& tiles, TilePlan& plan, int64_t& grid) {
    const int64_t max_tiles = (T + tl - 1) / tl + G;
    tiles = at::empty({kTileFields * max_tiles + 1}, g.perm.options());
    launch_batched_plan_groups(starts.data_ptr<int32_t>(), groups.data_ptr<int32_t>(), G, T, N,
                               tl, max_tiles, tiles.data_ptr<int64_t>(), stream);
    plan = TilePlan{g.perm.data_ptr<int64_t>(), tiles.data_ptr<int64_t>(), max_tiles, tl, 0};
    grid = max_tiles;
  };
  build(tile, g.tiles, g.plan, g.grid);
  if (gb_tile > 0) {
    build(gb_tile, g.tiles_gb, g.plan_gb, g.grid_gb);
    g.slots_gb = std::min(plan_max_slots(T, gb_tile), g.grid_gb);
  }
  g.plan_gb.max_slots = g.slots_gb;
  return g;
}

// keys -> stable sort -> tile plan(s); validates (one sync) unless disabled. gb_tile > 0 also
// builds the grad_values plan with tiles of gb_tile tokens. T >= 1. With a plan: its tiles
// (group_from_plan), after checking it against the ids under LORI_VALIDATE=full.
Grouping group_tokens(const char* op, const at::Tensor& ids, const BatchedPlan& bp,
                      const PoolTensors& pt, const BatchedShape& s, int tile, int gb_tile,
                      cudaStream_t stream) {
  const int64_t T = s.tokens, N = s.adapters;
  if (bp.given) {
    if (validation_level() < 2 || !validation_enabled(stream)) {
      return group_from_plan(bp, s, tile, gb_tile, stream);
    }
    // "full": the plan must be the ids' grouping; then the ids and used adapters are checked
    // as without a plan, and that grouping (equal to the plan's) is used.
    verify_batched_plan(op, ids, bp, N);
  }
  const at::Tensor idc = ids.contiguous();
  const bool validate = validation_enabled(stream);
  const auto opts = idc.options().dtype(at::kLong);
  at::Tensor keys = at::empty({T}, opts);
  // [first bad token, first bad adapter, tile count, (its slot count), grad tile count, grad
  // slot count]; -1 = ULLONG_MAX = none.
  at::Tensor info = validate ? at::full({6}, -1, opts) : at::Tensor();
  int64_t* infop = validate ? info.data_ptr<int64_t>() : nullptr;
  launch_batched_keys(idc.data_ptr(), idc.scalar_type() == at::kLong, T, pt.p,
                      keys.data_ptr<int64_t>(),
                      reinterpret_cast<unsigned long long*>(infop), stream);
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_keys = std::get<0>(sorted);
  Grouping g;
  g.perm = std::get<1>(sorted);
  auto build = [&](int tl, at::Tensor& tiles, TilePlan& plan, int64_t& grid, int at) {
    const int64_t max_tiles = plan_max_tiles(T, N, tl);
    tiles = at::empty({kTileFields * max_tiles + 1}, opts);
    launch_batched_plan(sorted_keys.data_ptr<int64_t>(), T, N, tl, max_tiles,
                        tiles.data_ptr<int64_t>(), validate ? infop + at : nullptr, stream);
    plan = TilePlan{g.perm.data_ptr<int64_t>(), tiles.data_ptr<int64_t>(), max_tiles, tl, 0};
    grid = max_tiles;
  };
  build(tile, g.tiles, g.plan, g.grid, 2);
  if (gb_tile > 0) {
    build(gb_tile, g.tiles_gb, g.plan_gb, g.grid_gb, 4);
    g.slots_gb = std::min(plan_max_slots(T, gb_tile), g.grid_gb);
  }
  if (validate) {
    // Scales are not read by the validation kernel: the first used adapter with a
    // non-finite scale is found with tensor ops on the device and read back with the flags
    // (same single copy). Ids out of range are clamped here; they fail above anyway.
    at::Tensor flags = info;
    if (N > 0) {
      const at::Tensor valid = idc.ge(0).logical_and(idc.lt(N)).to(at::kLong);
      const at::Tensor used =
          at::zeros({N}, opts).index_add_(0, idc.clamp(0, N - 1).to(at::kLong), valid);
      const at::Tensor bad = used.gt(0).logical_and(at::isfinite(pt.scales).logical_not());
      const at::Tensor first = at::where(bad.any(), bad.to(at::kInt).argmax(),
                                         at::full({}, -1, opts));
      flags = at::cat({info, first.to(at::kLong).view({1})});
    }
    const at::Tensor h = flags.cpu();  // the one synchronization
    const int64_t* hv = h.data_ptr<int64_t>();
    if (hv[0] != -1) {
      const int64_t t = hv[0];
      fail_batched_id(op, t, idc[t].item<int64_t>(), N);
    }
    // The lowest flagged adapter fails, with the CPU backend's error (it checks in adapter
    // order, metadata then scale).
    int64_t a = hv[1];
    const int64_t scale_bad = h.numel() > 6 ? hv[6] : -1;
    if (scale_bad != -1 && (a == -1 || scale_bad < a)) a = scale_bad;
    if (a != -1) {
      const at::Tensor off = pt.offsets[a].cpu();
      check_batched_adapter(op, a, off[0].item<int32_t>(), off[s.chunks].item<int32_t>(),
                            pt.value_starts[a].item<int64_t>(), pt.p.num_values,
                            pt.dists[a].item<int32_t>(), pt.scales[a].item<float>());
      TORCH_INTERNAL_ASSERT(false, op, ": adapter ", a, " flagged on the device but not here");
    }
    g.grid = hv[2];
    if (gb_tile > 0) {
      g.grid_gb = hv[4];
      g.slots_gb = hv[5];
    }
  }
  // The kernels index gbp by slot only below plan_gb.max_slots = the rows allocated for it.
  g.plan_gb.max_slots = g.slots_gb;
  return g;
}

// h partials (S, T, rank) in sorted order: x @ A_a^T per token, split over in_features.
std::pair<at::Tensor, int> batched_shrink_a(const char* op, const at::Tensor& x2,
                                            const BatchedShape& s, const PoolTensors& pt,
                                            const Grouping& g, cudaStream_t stream) {
  const int64_t T = s.tokens;
  const Split sp = plan_split(s.in_features, kAColTileHost, g.grid, sm_count(x2.get_device()),
                              T > kSmallTile ? INT32_MAX : decode_split_cap(T));
  check_grid_y(op, sp.splits, "column slices");
  at::Tensor partial =
      at::empty({sp.splits, T, s.rank}, x2.options().dtype(acc_dtype(x2.scalar_type())));
  dispatch(op, x2.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_batched_shrink_a<scalar_t>(x2.data_ptr<scalar_t>(), T, s.in_features, pt.p, g.plan,
                                      g.grid, sp.splits, sp.per_split,
                                      partial.data_ptr<acc_type_t<scalar_t>>(), stream);
  });
  return {partial, sp.splits};
}

at::Tensor batched_sparse_delta_cuda(const at::Tensor& x, const at::Tensor& ids,
                                     const at::Tensor& masks, const at::Tensor& values,
                                     const at::Tensor& value_starts, const at::Tensor& offsets,
                                     const at::Tensor& seeds, const at::Tensor& scales,
                                     const at::Tensor& distributions, int64_t rank,
                                     const std::optional<at::Tensor>& base,
                                     const std::optional<at::Tensor>& plan_order,
                                     const std::optional<at::Tensor>& plan_starts,
                                     const std::optional<at::Tensor>& plan_adapters) {
  const char* op = "batched_sparse_delta";
  const BatchedShape s = check_batched_args(op, x, ids, masks, values, value_starts, offsets,
                                            seeds, scales, distributions, rank);
  const BatchedPlan bp = check_batched_plan(op, plan_order, plan_starts, plan_adapters, x, s);
  const bool accumulate = base.has_value() && base->defined();
  if (accumulate) check_batched_out_like(op, "base", *base, x, s);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out_shape = x.sizes().vec();
  out_shape.back() = s.out_features;
  // With a trusted plan, y starts at 0: a token no group covers then reads 0, never stale
  // memory (a plan made by AdapterPool.plan covers every token).
  at::Tensor y = accumulate ? base->clone(at::MemoryFormat::Contiguous)
                 : bp.given ? at::zeros(out_shape, x.options())
                            : at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t T = s.tokens;
  if (T == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const PoolTensors pt = pool_view(masks, offsets, value_starts, seeds, scales, distributions,
                                   values.numel(), s);
  const Grouping g = group_tokens(op, ids, bp, pt, s,
                                  batched_tile(T, s.adapters, x.scalar_type(), rank), 0, stream);
  if (s.out_features == 0) return y;
  const at::Tensor x2 = x.reshape({T, s.in_features}).contiguous();
  const at::Tensor v = values.contiguous();
  const int64_t nch = s.chunks;
  const int sms = sm_count(x.get_device());
  // Chunks per block: up to 4 (h read once per 256 rows) while >= 4 blocks per SM remain.
  // Checked before shrink_a runs, so a too-large B fails before any work is queued.
  int64_t cpb = 4;
  while (cpb > 1 && g.grid * ((nch + cpb - 1) / cpb) < 4 * sms) cpb /= 2;
  check_grid_y(op, (nch + cpb - 1) / cpb, "64-row chunk groups of B");
  auto hp = batched_shrink_a(op, x2, s, pt, g, stream);
  // Prefill: each chunk-group block would re-read all S partials of its tile, so they are
  // summed once first (rows of "no adapter" tokens hold garbage there and are never read).
  const bool presum = hp.second > 1 && T > kSmallTile;
  const at::Tensor partial = presum ? hp.first.sum(0, /*keepdim=*/true) : hp.first;
  const int splits = presum ? 1 : hp.second;
  dispatch(op, x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_batched_expand_b<scalar_t>(partial.data_ptr<acc_type_t<scalar_t>>(), splits, T, pt.p,
                                      v.data_ptr<scalar_t>(), g.plan, g.grid, cpb, accumulate,
                                      y.data_ptr<scalar_t>(), stream);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> batched_sparse_delta_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& ids, const at::Tensor& masks,
    const at::Tensor& values, const at::Tensor& value_starts, const at::Tensor& offsets,
    const at::Tensor& seeds, const at::Tensor& scales, const at::Tensor& distributions,
    int64_t rank, bool need_x, bool need_values, const std::optional<at::Tensor>& plan_order,
    const std::optional<at::Tensor>& plan_starts, const std::optional<at::Tensor>& plan_adapters) {
  const char* op = "batched_sparse_delta_backward";
  const BatchedShape s = check_batched_args(op, x, ids, masks, values, value_starts, offsets,
                                            seeds, scales, distributions, rank);
  check_batched_out_like(op, "grad_y", grad_y, x, s);
  const BatchedPlan bp = check_batched_plan(op, plan_order, plan_starts, plan_adapters, x, s);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = s.tokens, out = s.out_features, nch = s.chunks;
  // grad_x: every row is written by expand_a (zeros for "no adapter" tokens) when it runs.
  const bool work = T > 0 && out > 0 && (need_x || need_values);
  at::Tensor gx = !need_x ? at::empty({0}, x.options())
                  : work && !bp.given
                      ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                      : at::zeros(x.sizes(), x.options());  // a trusted plan: as y above
  at::Tensor gv = need_values ? at::zeros({values.numel()}, values.options())
                              : at::empty({0}, values.options());
  if (T == 0) return {gx, gv};
  // Grid limits first, before any kernel runs.
  if (work && need_values) check_grid_y(op, nch, "64-row chunks of B");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(x.get_device());
  const PoolTensors pt = pool_view(masks, offsets, value_starts, seeds, scales, distributions,
                                   values.numel(), s);
  // grad_values' token tiles: enough (tiles x chunks ~ 4 blocks per SM) to fill the GPU.
  const int64_t slices = std::max<int64_t>(1, 4 * sms / std::max<int64_t>(1, nch));
  const int64_t per = std::max<int64_t>(32, (T + slices - 1) / slices);
  const int gb_tile = need_values && work ? static_cast<int>(std::min<int64_t>(
                                                (per + 31) / 32 * 32, 1 << 20))
                                          : 0;
  const Grouping g = group_tokens(op, ids, bp, pt, s,
                                  batched_tile(T, s.adapters, x.scalar_type(), rank), gb_tile,
                                  stream);
  if (!work) return {gx, gv};
  const at::Tensor gy2 = grad_y.reshape({T, out}).contiguous();
  const at::Tensor v = values.contiguous();
  const auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  if (need_x) {
    const Split sp = plan_split(nch, 1, g.grid, sms,
                                T > kSmallTile ? INT32_MAX : decode_split_cap(T));
    check_grid_y(op, sp.splits, "chunk groups");
    check_grid_y(op, (s.in_features + kAColTileHost - 1) / kAColTileHost, "64-column tiles of A");
    at::Tensor gh = at::empty({sp.splits, T, rank}, acc);
    dispatch(op, x.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      launch_batched_shrink_b<scalar_t>(gy2.data_ptr<scalar_t>(), T, pt.p, v.data_ptr<scalar_t>(),
                                        g.plan, g.grid, sp.splits, sp.per_split,
                                        gh.data_ptr<acc_type_t<scalar_t>>(), stream);
    });
    const bool presum = sp.splits > 1 && T > kSmallTile;
    if (presum) gh = gh.sum(0, /*keepdim=*/true);
    const int splits = presum ? 1 : sp.splits;
    dispatch(op, x.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      launch_batched_expand_a<scalar_t>(gh.data_ptr<acc_type_t<scalar_t>>(), splits, T,
                                        s.in_features, pt.p, g.plan, g.grid,
                                        gx.data_ptr<scalar_t>(), stream);
    });
  }
  if (need_values) {
    const at::Tensor x2 = x.reshape({T, s.in_features}).contiguous();
    const auto hp = batched_shrink_a(op, x2, s, pt, g, stream);
    // (T, rank) in sorted order; a plain sum over dim 0: fixed order, deterministic.
    const at::Tensor h = hp.second == 1 ? hp.first[0] : hp.first.sum(0);
    // Per-slot partials of multi-tile groups only (single-tile groups add straight into
    // grad_values): at most plan_max_slots(T, gb_tile) * out * rank, independent of N.
    at::Tensor gbp = at::empty({g.slots_gb, out, rank}, acc);
    // fp32 / fp64 values take the atomics directly; bf16 / fp16 go through an fp32 buffer.
    const bool direct = values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble;
    at::Tensor gacc = direct ? gv : at::zeros({values.numel()}, acc);
    dispatch(op, x.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      using acc_t = acc_type_t<scalar_t>;
      launch_batched_grad_values<scalar_t>(gy2.data_ptr<scalar_t>(), h.data_ptr<acc_t>(), T,
                                           pt.p, g.plan_gb, g.grid_gb, gbp.data_ptr<acc_t>(),
                                           gacc.data_ptr<acc_t>(), stream);
    });
    if (!direct) gv.copy_(gacc);
  }
  return {gx, gv};
}

}  // namespace
}  // namespace lori::cuda

TORCH_LIBRARY_IMPL(lori, CUDA, m) {
  m.impl("batched_sparse_delta", &lori::cuda::batched_sparse_delta_cuda);
  m.impl("batched_sparse_delta_backward", &lori::cuda::batched_sparse_delta_backward_cuda);
}

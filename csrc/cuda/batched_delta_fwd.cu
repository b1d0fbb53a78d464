// CUDA forward of batched_sparse_delta: many adapters of one pool in one batch.
//
//   y[t] = base[t] + scales[a] * (x[t] @ A_a^T) @ B_a^T,  a = adapter_ids[t]  (-1: no adapter)
//
// Grouping (punica SGMV / vLLM lora_shrink + lora_expand), all on the device:
// 1. keys: keys[t] = ids[t] when it is a valid adapter, else N (the "no adapter" group); with
//    validation on, the first bad id and the first used adapter with bad metadata are recorded
//    for the host (one small copy, one sync: see ops_cuda_batched.cpp).
// 2. (host) perm = stable argsort of keys (at::sort): tokens stay where they are, blocks
//    gather their rows through perm.
// (With a plan argument steps 1-2 are skipped: perm = plan_order and step 3 reads the plan's
// group bounds instead of searching the keys.)
// 3. plan: one block binary-searches each group's [start, end) in the sorted keys, cuts it
//    into tiles of <= TT tokens and writes the tile list (kernels.cuh: TilePlan; the slots of
//    multi-tile groups serve the backward's grad_values).
// 4. shrink_a: grid (tiles, column slices). A block generates its adapter's A tile (32 ranks x
//    64 columns) once per 64 columns and reuses it for all of the tile's tokens (split-K over
//    in_features fills the GPU at decode), writing (S, T, R) partials in sorted order.
// 5. (host, prefill) the partials are summed once (at::sum, fixed order).
// 6. expand_b: grid (tiles, groups of 64-row chunks). Sums its tile's partials into h (shared),
//    then each thread owns one output row of the adapter's B and walks its mask bits once
//    (B read in the bitmask form), writing y rows perm[q] once (+ base, rounded once); tiles
//    of the "no adapter" group write zeros (or leave base).
// SIMT throughout (fp32 accumulation, fp64 for float64): the tensor-core paths of
// sparse_delta are not used here.
#include "common.cuh"

namespace lori::cuda {
namespace {

constexpr int kALd = kAColTile + 8;  // padded row of an A tile: conflict-free reads

template <typename id_t>
__global__ void __launch_bounds__(kThreads)
    batched_keys_kernel(const id_t* __restrict__ ids, int64_t T, BatchedPool p,
                        int64_t* __restrict__ keys, unsigned long long* __restrict__ bad) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= T) return;
  const int64_t id = static_cast<int64_t>(ids[t]);
  const bool valid = id >= 0 && id < p.adapters;
  keys[t] = valid ? id : p.adapters;
  if (bad == nullptr) return;
  if (id < -1 || id >= p.adapters) atomicMin(bad, static_cast<unsigned long long>(t));
  if (valid) {
    // check_batched_adapter's rules (batched_checks.cpp), overflow-safe.
    const int32_t* off = p.offsets + id * (p.chunks + 1);
    const int64_t nnz = off[p.chunks], vs = p.value_starts[id];
    const int32_t dist = p.dists[id];
    const bool ok = off[0] == 0 && vs >= 0 && nnz >= 0 && nnz <= p.num_values &&
                    vs <= p.num_values - nnz && (dist == kRademacher || dist == kUniform);
    if (!ok) atomicMin(bad + 1, static_cast<unsigned long long>(id));
  }
}

// First index i in [0, n) with a[i] >= v (n if none); a sorted ascending.
__device__ __forceinline__ int64_t lower_bound(const int64_t* __restrict__ a, int64_t n,
                                               int64_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] < v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Exclusive prefix sum of v over the block (blockDim.x a multiple of 32, <= 1024); *total gets
// the block's sum in every thread. All threads must call it; it syncs.
__device__ __forceinline__ int64_t block_exclusive_sum(int64_t v, int64_t* warp_sums,
                                                      int64_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = static_cast<int>(blockDim.x >> 5);
  int64_t inc = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int64_t n = __shfl_up_sync(0xffffffffu, inc, d);
    if (lane >= d) inc += n;
  }
  __syncthreads();  // earlier readers of warp_sums are done
  if (lane == 31) warp_sums[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < nwarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int64_t n = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w += n;
    }
    if (lane < nwarps) warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  *total = warp_sums[nwarps - 1];
  return (warp == 0 ? 0 : warp_sums[warp - 1]) + inc - v;
}

constexpr int kPlanThreads = 256;

// One thread per group: from the sorted keys (groups 0..N, N = "no adapter") or, kFromPlan,
// from a plan's G groups (starts / groups; bounds clamped, adapters outside [0, N) -> N).
template <bool kFromPlan>
__global__ void __launch_bounds__(kPlanThreads)
    batched_plan_kernel(const int64_t* __restrict__ keys, const int32_t* __restrict__ gstarts,
                        const int32_t* __restrict__ gadapters, int64_t ngroups, int64_t T,
                        int64_t adapters, int tile, int64_t max_tiles,
                        int64_t* __restrict__ tiles, int64_t* __restrict__ count_out) {
  __shared__ int64_t warp_sums[kPlanThreads / 32];
  int64_t carry = 0, carry_s = 0;  // tiles / slots of the groups before this pass (uniform)
  const int64_t n_items = kFromPlan ? ngroups : adapters + 1;
  for (int64_t base = 0; base < n_items; base += kPlanThreads) {
    const int64_t g = base + threadIdx.x;
    int64_t start = 0, len = 0, group = g;
    if (g < n_items) {
      if (kFromPlan) {
        int64_t a = gstarts[g], b = gstarts[g + 1];
        a = a < 0 ? 0 : (a > T ? T : a);
        b = b < a ? a : (b > T ? T : b);
        start = a;
        len = b - a;
        const int64_t ad = gadapters[g];
        group = ad >= 0 && ad < adapters ? ad : adapters;
      } else {
        start = lower_bound(keys, T, g);
        const int64_t end = g == adapters ? T : lower_bound(keys, T, g + 1);
        len = end - start;
      }
    }
    const int64_t nt = (len + tile - 1) / tile;
    const int64_t ns = nt > 1 ? nt : 0;  // slots: tiles of multi-tile groups
    int64_t total = 0, total_s = 0;
    const int64_t first = carry + block_exclusive_sum(nt, warp_sums, &total);
    const int64_t first_s = carry_s + block_exclusive_sum(ns, warp_sums, &total_s);
    for (int64_t j = 0; j < nt; ++j) {
      const int64_t i = first + j;
      if (i >= max_tiles) break;
      int64_t* r = tiles + kTileFields * i;
      r[0] = group;
      r[1] = start + j * tile;
      r[2] = len - j * tile < tile ? len - j * tile : tile;
      r[3] = j == 0 ? nt : 0;
      r[4] = ns > 0 ? first_s + j : -1;
    }
    carry += total;
    carry_s += total_s;
  }
  if (threadIdx.x == 0) {
    const int64_t n = carry < max_tiles ? carry : max_tiles;
    tiles[kTileFields * max_tiles] = n;
    if (count_out != nullptr) {
      count_out[0] = n;
      count_out[1] = carry_s;
    }
  }
}

// ---- shrink_a ----------------------------------------------------------------------------------
// As sparse_delta's shrink_a_kernel, on one tile of one adapter's tokens (rows through perm).
// Thread (r = tid / 8, js = tid % 8): rank r of the group, columns js, js + 8, ... of the tile.
template <typename scalar_t, int TT>
__global__ void __launch_bounds__(kThreads)
    batched_shrink_a_kernel(const scalar_t* __restrict__ x, int64_t T, int64_t in, BatchedPool p,
                            TilePlan plan, int64_t slice_cols,
                            acc_type_t<scalar_t>* __restrict__ partial) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t xs[TT][kAColTile];
  __shared__ acc_t as[kRGroup * kALd];
  __shared__ uint32_t words_s[kRGroup * 4];
  __shared__ int64_t toks[TT];
  const Tile tl = load_tile(plan, blockIdx.x, TT);
  if (tl.len == 0 || tl.group >= p.adapters) return;  // block-uniform
  load_tile_tokens<TT>(plan, tl, toks);
  const AGen g = adapter_agen(p, tl.group);
  const int rank = p.rank;
  const int tid = threadIdx.x, r = tid >> 3, js = tid & 7;
  const int64_t s = blockIdx.y;
  const int64_t c_begin = s * slice_cols;
  const int64_t c_end = c_begin + slice_cols < in ? c_begin + slice_cols : in;
  const int nt = tl.len;
  __syncthreads();  // toks ready
  for (int r0 = 0; r0 < rank; r0 += kRGroup) {
    acc_t acc[TT];
#pragma unroll
    for (int t = 0; t < TT; ++t) acc[t] = acc_t(0);
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kAColTile) {
      __syncthreads();  // readers of the previous xs are done
      for (int e = tid; e < TT * kAColTile; e += kThreads) {
        const int t = e / kAColTile, j = e % kAColTile;
        const int64_t col = c0 + j;
        xs[t][j] = (t < nt && col < c_end) ? load_acc<acc_t>(x + toks[t] * in + col) : acc_t(0);
      }
      gen_a_tile(g, r0, rank, c0, as, kALd, words_s);  // syncs: xs and as ready
#pragma unroll
      for (int i = 0; i < kAColTile / 8; ++i) {
        const int j = js + 8 * i;
        const acc_t a = as[r * kALd + j];
#pragma unroll
        for (int t = 0; t < TT; ++t) acc[t] += xs[t][j] * a;
      }
    }
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      acc_t v = acc[t];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      if (js == 0 && t < nt && r0 + r < rank) {
        partial[(s * T + tl.start + t) * rank + r0 + r] = v;
      }
    }
  }
}

// ---- expand_b ----------------------------------------------------------------------------------
// As sparse_delta's expand_b_kernel on one tile. Thread (ol = tid % 64, tg = tid / 64): output
// row c * 64 + ol, tokens tg, tg + 4, ... of the tile.
template <typename scalar_t, int TT>
__global__ void __launch_bounds__(kThreads)
    batched_expand_b_kernel(const acc_type_t<scalar_t>* __restrict__ partial, int splits,
                            int64_t T, BatchedPool p, const scalar_t* __restrict__ values,
                            TilePlan plan, int64_t chunks_per_block, bool accumulate,
                            scalar_t* __restrict__ y) {
  using acc_t = acc_type_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* hs = reinterpret_cast<acc_t*>(smem_raw);  // [TT][rank]
  __shared__ int rs[kRowChunk + 1];
  __shared__ int64_t toks[TT];
  constexpr int kTpt = TT / 4;
  const Tile tl = load_tile(plan, blockIdx.x, TT);
  if (tl.len == 0) return;  // block-uniform
  const bool idle = tl.group >= p.adapters;
  if (idle && accumulate) return;  // y already holds base
  const int tid = threadIdx.x, rank = p.rank, nt = tl.len;
  const int64_t out = p.out;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * chunks_per_block;
  const int64_t c_end = c_begin + chunks_per_block < p.chunks ? c_begin + chunks_per_block
                                                              : p.chunks;
  load_tile_tokens<TT>(plan, tl, toks);
  __syncthreads();  // toks ready
  if (idle) {
    const int64_t o0 = c_begin * kRowChunk;
    const int64_t o1 = c_end * kRowChunk < out ? c_end * kRowChunk : out;
    const int64_t rows = o1 > o0 ? o1 - o0 : 0;
    for (int64_t e = tid; e < nt * rows; e += kThreads) {
      const int t = static_cast<int>(e / rows);
      y[toks[t] * out + o0 + e % rows] = from_acc<scalar_t>(acc_t(0));
    }
    return;
  }
  sum_partials<TT>(partial, splits, T, tl.start, nt, rank, acc_t(1), hs);
  int64_t vs = 0;
  const BMask b = adapter_bmask(p, tl.group, &vs);
  const scalar_t* v = values + vs;
  const acc_t scale = static_cast<acc_t>(p.scales[tl.group]);
  const int ol = tid % kRowChunk, tg = tid / kRowChunk;
  for (int64_t c = c_begin; c < c_end; ++c) {
    chunk_row_starts(b, c, rs);  // syncs: hs and rs ready
    const ChunkRange cr = chunk_range(b, c);
    const int64_t o = c * kRowChunk + ol;
    if (o >= out) continue;
    acc_t acc[kTpt];
#pragma unroll
    for (int i = 0; i < kTpt; ++i) acc[i] = acc_t(0);
    int64_t q = cr.lo + rs[ol];
    for (int w = 0; w < b.words; ++w) {
      for (uint32_t bits = mask_word(b, o, w); bits; bits &= bits - 1, ++q) {
        if (q >= cr.hi) break;
        const int k = 32 * w + ctz32(bits);
        const acc_t bv = load_acc<acc_t>(v + q);
#pragma unroll
        for (int i = 0; i < kTpt; ++i) acc[i] += bv * hs[(tg + 4 * i) * rank + k];
      }
    }
#pragma unroll
    for (int i = 0; i < kTpt; ++i) {
      const int t = tg + 4 * i;
      if (t < nt) {
        scalar_t* dst = y + toks[t] * out + o;
        const acc_t d = acc[i] * scale;
        *dst = from_acc<scalar_t>(accumulate ? load_acc<acc_t>(dst) + d : d);
      }
    }
  }
}

}  // namespace

void launch_batched_keys(const void* ids, bool ids64, int64_t T, const BatchedPool& p,
                         int64_t* keys, unsigned long long* bad, cudaStream_t stream) {
  if (T == 0) return;
  const unsigned blocks = static_cast<unsigned>(ceil_div(T, kThreads));
  if (ids64) {
    batched_keys_kernel<int64_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const int64_t*>(ids), T, p, keys, bad);
  } else {
    batched_keys_kernel<int32_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<const int32_t*>(ids), T, p, keys, bad);
  }
  LORI_LAUNCH_CHECK();
}

void launch_batched_plan(const int64_t* sorted_keys, int64_t T, int64_t adapters, int tile,
                         int64_t max_tiles, int64_t* tiles, int64_t* count_out,
                         cudaStream_t stream) {
  batched_plan_kernel<false><<<1, kPlanThreads, 0, stream>>>(
      sorted_keys, nullptr, nullptr, 0, T, adapters, tile, max_tiles, tiles, count_out);
  LORI_LAUNCH_CHECK();
}

void launch_batched_plan_groups(const int32_t* starts, const int32_t* groups, int64_t G,
                                int64_t T, int64_t adapters, int tile, int64_t max_tiles,
                                int64_t* tiles, cudaStream_t stream) {
  batched_plan_kernel<true><<<1, kPlanThreads, 0, stream>>>(
      nullptr, starts, groups, G, T, adapters, tile, max_tiles, tiles, nullptr);
  LORI_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_batched_shrink_a(const scalar_t* x, int64_t T, int64_t in, const BatchedPool& p,
                             const TilePlan& plan, int64_t grid_tiles, int splits,
                             int64_t slice_cols, acc_type_t<scalar_t>* partial,
                             cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(grid_tiles), static_cast<unsigned>(splits));
  TORCH_INTERNAL_ASSERT((plan.tile == kSmallTile || !std::is_same_v<scalar_t, double>),
                        "batched shrink_a: tile ", plan.tile, " for double");
  LORI_TILE_SWITCH(plan.tile, (!std::is_same_v<scalar_t, double>), TILE, [&] {
    batched_shrink_a_kernel<scalar_t, TILE>
        <<<grid, kThreads, 0, stream>>>(x, T, in, p, plan, slice_cols, partial);
  });
  LORI_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_batched_expand_b(const acc_type_t<scalar_t>* partial, int splits, int64_t T,
                             const BatchedPool& p, const scalar_t* values, const TilePlan& plan,
                             int64_t grid_tiles, int64_t chunks_per_block, bool accumulate,
                             scalar_t* y, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(grid_tiles),
                  static_cast<unsigned>(ceil_div(p.chunks, chunks_per_block)));
  const size_t smem = static_cast<size_t>(plan.tile) * p.rank * sizeof(acc_type_t<scalar_t>);
  LORI_TILE_SWITCH(plan.tile, true, TILE, [&] {
    auto kernel = &batched_expand_b_kernel<scalar_t, TILE>;
    raise_dynamic_smem<acc_type_t<scalar_t>>(kernel, plan.tile, smem);
    kernel<<<grid, kThreads, smem, stream>>>(partial, splits, T, p, values, plan,
                                             chunks_per_block, accumulate, y);
  });
  LORI_LAUNCH_CHECK();
}

#define LORI_INSTANTIATE(scalar_t)                                                              \
  template void launch_batched_shrink_a<scalar_t>(const scalar_t*, int64_t, int64_t,            \
                                                  const BatchedPool&, const TilePlan&, int64_t, \
                                                  int, int64_t, acc_type_t<scalar_t>*,          \
                                                  cudaStream_t);                                \
  template void launch_batched_expand_b<scalar_t>(const acc_type_t<scalar_t>*, int, int64_t,    \
                                                  const BatchedPool&, const scalar_t*,          \
                                                  const TilePlan&, int64_t, int64_t, bool,      \
                                                  scalar_t*, cudaStream_t);
LORI_INSTANTIATE(float)
LORI_INSTANTIATE(double)
LORI_INSTANTIATE(c10::Half)
LORI_INSTANTIATE(c10::BFloat16)
#undef LORI_INSTANTIATE

}  // namespace lori::cuda

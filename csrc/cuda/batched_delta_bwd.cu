// CUDA backward of batched_sparse_delta, on the forward's tile plan (batched_delta_fwd.cu):
//   gh[t]                = scales[a] * grad_y[t] @ B_a              shrink_b (+ at::sum)
//   grad_x[t]            = gh[t] @ A_a   (0 where a is -1)          expand_a
//   grad_values[a's p]  += scales[a] * sum_{t of a} grad_y[t, o] h[t, k],  p = entry (o, k)
//                          with h = x @ A_a^T (shrink_a, recomputed)  grad_b + gather
// shrink_b: grid (tiles, chunk splits); per chunk the block decodes 64 rows x 32 ranks of the
//   adapter's B into a dense shared tile and multiplies the tile's gy rows (gathered via perm).
// expand_a: grid (tiles, 64-column tiles of A); A generated in shared memory per 32 ranks.
// grad_b: grid (tiles of the grad plan, chunks): dense 64 x R blocks of gy^T h per tile. The
//   tile of a single-tile group adds its block's pattern entries to grad_values itself (one
//   atomicAdd per entry and group); a tile of a multi-tile group stores its block in its slot
//   of gbp (slots exist only for multi-tile groups, so gbp does not grow with the adapters).
// gather: per multi-tile group's first tile and chunk, walks the mask once and adds the sum
//   over the group's slots (fixed order) to the pattern entries: one atomicAdd per entry.
#include "common.cuh"

namespace lori::cuda {
namespace {

constexpr int kALd = kAColTile + 8;
constexpr int kBLd = kRGroup + 1;  // decoded B rows: conflict-free column reads

// Thread (r = tid % 32, ts = tid / 32): rank 32 g + r, tokens ts, ts + 8, ... of the tile.
template <typename scalar_t, int TT>
__global__ void __launch_bounds__(kThreads)
    batched_shrink_b_kernel(const scalar_t* __restrict__ gy, int64_t T, BatchedPool p,
                            const scalar_t* __restrict__ values, TilePlan plan,
                            int64_t chunks_per_split, acc_type_t<scalar_t>* __restrict__ partial) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t gys[TT][kRowChunk];
  __shared__ acc_t bd[kRowChunk * kBLd];
  __shared__ int rs[kRowChunk + 1];
  __shared__ int64_t toks[TT];
  constexpr int kTpt = TT / 8;
  const Tile tl = load_tile(plan, blockIdx.x, TT);
  if (tl.len == 0 || tl.group >= p.adapters) return;  // block-uniform
  load_tile_tokens<TT>(plan, tl, toks);                 // first read after chunk_row_starts' sync
  int64_t vs = 0;
  const BMask b = adapter_bmask(p, tl.group, &vs);
  const scalar_t* v = values + vs;
  const int tid = threadIdx.x, r = tid & 31, ts = tid >> 5, nt = tl.len;
  const int64_t s = blockIdx.y, out = p.out;
  const int64_t c_begin = s * chunks_per_split;
  const int64_t c_end = c_begin + chunks_per_split < p.chunks ? c_begin + chunks_per_split
                                                              : p.chunks;
  for (int g = 0; g < b.words; ++g) {
    acc_t acc[kTpt];
#pragma unroll
    for (int i = 0; i < kTpt; ++i) acc[i] = acc_t(0);
    for (int64_t c = c_begin; c < c_end; ++c) {
      chunk_row_starts(b, c, rs);  // syncs first: toks written; readers of gys / bd are done
      const ChunkRange cr = chunk_range(b, c);
      for (int e = tid; e < TT * kRowChunk; e += kThreads) {
        const int t = e / kRowChunk, ol = e % kRowChunk;
        const int64_t o = c * kRowChunk + ol;
        gys[t][ol] = (t < nt && o < out) ? load_acc<acc_t>(gy + toks[t] * out + o) : acc_t(0);
      }
      decode_b_chunk(b, v, c, rs, cr, g, bd, kBLd);
      __syncthreads();
#pragma unroll 4
      for (int ol = 0; ol < kRowChunk; ++ol) {
        const acc_t bv = bd[ol * kBLd + r];
#pragma unroll
        for (int i = 0; i < kTpt; ++i) acc[i] += gys[ts + 8 * i][ol] * bv;
      }
    }
    const int k = kRGroup * g + r;
#pragma unroll
    for (int i = 0; i < kTpt; ++i) {
      const int t = ts + 8 * i;
      if (t < nt && k < b.rank) partial[(s * T + tl.start + t) * b.rank + k] = acc[i];
    }
  }
}

// Thread (j = tid % 64, ts = tid / 64): column c0 + j, tokens ts, ts + 4, ... of the tile.
template <typename scalar_t, int TT>
__global__ void __launch_bounds__(kThreads)
    batched_expand_a_kernel(const acc_type_t<scalar_t>* __restrict__ partial, int splits,
                            int64_t T, int64_t in, BatchedPool p, TilePlan plan,
                            scalar_t* __restrict__ gx) {
  using acc_t = acc_type_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* ghs = reinterpret_cast<acc_t*>(smem_raw);  // [TT][rank]
  __shared__ acc_t as[kRGroup * kALd];
  __shared__ uint32_t words_s[kRGroup * 4];
  __shared__ int64_t toks[TT];
  constexpr int kTpt = TT / 4;
  const Tile tl = load_tile(plan, blockIdx.x, TT);
  if (tl.len == 0) return;  // block-uniform
  const int tid = threadIdx.x, j = tid % kAColTile, ts = tid / kAColTile, nt = tl.len;
  const int rank = p.rank;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kAColTile, col = c0 + j;
  load_tile_tokens<TT>(plan, tl, toks);
  __syncthreads();  // toks ready
  if (tl.group >= p.adapters) {  // no adapter: grad_x rows are 0
    if (col < in) {
      for (int t = ts; t < nt; t += kThreads / kAColTile) {
        gx[toks[t] * in + col] = from_acc<scalar_t>(acc_t(0));
      }
    }
    return;
  }
  const AGen g = adapter_agen(p, tl.group);
  sum_partials<TT>(partial, splits, T, tl.start, nt, rank,
                   static_cast<acc_t>(p.scales[tl.group]), ghs);
  acc_t acc[kTpt];
#pragma unroll
  for (int i = 0; i < kTpt; ++i) acc[i] = acc_t(0);
  for (int r0 = 0; r0 < rank; r0 += kRGroup) {
    gen_a_tile(g, r0, rank, c0, as, kALd, words_s);  // syncs before and after: ghs ready too
    const int nr = rank - r0 < kRGroup ? rank - r0 : kRGroup;
    for (int rr = 0; rr < nr; ++rr) {
      const acc_t a = as[rr * kALd + j];
#pragma unroll
      for (int i = 0; i < kTpt; ++i) acc[i] += ghs[(ts + 4 * i) * rank + r0 + rr] * a;
    }
  }
  if (col >= in) return;
#pragma unroll
  for (int i = 0; i < kTpt; ++i) {
    const int t = ts + 4 * i;
    if (t < nt) gx[toks[t] * in + col] = from_acc<scalar_t>(acc[i]);
  }
}

constexpr int kGbTokens = 32;  // tokens per shared-memory step of grad_b

// Thread (ol = tid / 4, rq = tid % 4): row c * 64 + ol, ranks 32 g + 8 rq .. + 8, summed over
// the tile's tokens (any count: walked 32 at a time). A single-tile group's tile (slot -1)
// adds scale * sum to gacc at the pattern entries among them; a multi-tile group's tile writes
// gbp[slot, o, k] for o < out, k < R.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    batched_grad_b_kernel(const scalar_t* __restrict__ gy,
                          const acc_type_t<scalar_t>* __restrict__ h, BatchedPool p,
                          TilePlan plan, acc_type_t<scalar_t>* __restrict__ gbp,
                          acc_type_t<scalar_t>* __restrict__ gacc) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t gys[kGbTokens][kRowChunk];
  __shared__ acc_t hs[kGbTokens][kRGroup + 1];
  __shared__ int64_t toks[kGbTokens];
  __shared__ int rs[kRowChunk + 1];
  const Tile tl = load_tile(plan, blockIdx.x, plan.tile);
  if (tl.len == 0 || tl.group >= p.adapters) return;  // block-uniform
  const bool direct = tl.slot < 0;                     // block-uniform
  if (!direct && tl.slot >= plan.max_slots) return;   // (a plan inconsistent with gbp)
  const int tid = threadIdx.x, ol = tid >> 2, rq = tid & 3, rank = p.rank;
  const int64_t c = blockIdx.y, out = p.out;
  const int64_t o = c * kRowChunk + ol;
  // Direct adds: the entry index of (o, k) is cr.lo + rs[ol] + the popcounts of row o's mask
  // before bit k (as decode_b_chunk); `before` holds those of the words already done.
  int64_t vs = 0;
  const BMask b = adapter_bmask(p, tl.group, &vs);
  const acc_t scale = static_cast<acc_t>(p.scales[tl.group]);
  ChunkRange cr{0, 0};
  if (direct) {
    chunk_row_starts(b, c, rs);  // all threads (it syncs); rs is not written again below
    cr = chunk_range(b, c);
  }
  int64_t before = 0;
  for (int g = 0; g < p.words; ++g) {
    acc_t acc[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) acc[q] = acc_t(0);
    for (int t0 = 0; t0 < tl.len; t0 += kGbTokens) {
      __syncthreads();  // readers of the previous tiles are done
      if (tid < kGbTokens) toks[tid] = t0 + tid < tl.len ? plan.perm[tl.start + t0 + tid] : 0;
      __syncthreads();
      for (int e = tid; e < kGbTokens * kRowChunk; e += kThreads) {
        const int t = e / kRowChunk, cl = e % kRowChunk;
        const int64_t oo = c * kRowChunk + cl;
        gys[t][cl] = (t0 + t < tl.len && oo < out) ? load_acc<acc_t>(gy + toks[t] * out + oo)
                                                   : acc_t(0);
      }
      for (int e = tid; e < kGbTokens * kRGroup; e += kThreads) {
        const int t = e / kRGroup, kk = e % kRGroup, k = kRGroup * g + kk;
        hs[t][kk] = (t0 + t < tl.len && k < rank) ? h[(tl.start + t0 + t) * rank + k] : acc_t(0);
      }
      __syncthreads();
#pragma unroll 4
      for (int t = 0; t < kGbTokens; ++t) {
        const acc_t gv = gys[t][ol];
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[q] += gv * hs[t][rq * 8 + q];
      }
    }
    if (o < out && direct) {
      const uint32_t word = mask_word(b, o, g);  // bits >= rank cleared
      const uint32_t mine = (word >> (8 * rq)) & 0xffu;
      int64_t e = cr.lo + rs[ol] + before + popcount32(word & ((1u << (8 * rq)) - 1u));
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        if ((mine >> q) & 1u) {
          if (e >= cr.lo && e < cr.hi) atomicAdd(gacc + vs + e, acc[q] * scale);
          ++e;
        }
      }
      before += popcount32(word);
    } else if (o < out) {
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const int k = kRGroup * g + rq * 8 + q;
        if (k < rank) gbp[(tl.slot * out + o) * rank + k] = acc[q];
      }
    }
  }
}

// 64 threads per (multi-tile group's first tile, chunk), thread per row: for each pattern entry
// p = (o, k) of the chunk, gacc[vs + p] += scale * sum over the group's slots of gbp[., o, k].
template <typename acc_t>
__global__ void __launch_bounds__(kRowChunk)
    batched_gather_grad_kernel(const acc_t* __restrict__ gbp, BatchedPool p, TilePlan plan,
                               acc_t* __restrict__ gacc) {
  __shared__ int rs[kRowChunk + 1];
  const Tile tl = load_tile(plan, blockIdx.x, plan.tile);
  if (tl.len == 0 || tl.group >= p.adapters || tl.seg_tiles <= 1 || tl.slot < 0 ||
      tl.slot >= plan.max_slots) {
    return;  // block-uniform; single-tile groups were added by grad_b
  }
  const int64_t c = blockIdx.y, out = p.out, s0 = tl.slot;
  // The group's tiles have the consecutive slots s0 .. s0 + seg_tiles - 1, within gbp.
  const int64_t seg = tl.seg_tiles < plan.max_slots - s0 ? tl.seg_tiles : plan.max_slots - s0;
  int64_t vs = 0;
  const BMask b = adapter_bmask(p, tl.group, &vs);
  const acc_t scale = static_cast<acc_t>(p.scales[tl.group]);
  chunk_row_starts(b, c, rs);
  const ChunkRange cr = chunk_range(b, c);
  const int64_t o = c * kRowChunk + threadIdx.x;
  if (o >= out) return;
  int64_t q = cr.lo + rs[threadIdx.x];
  for (int w = 0; w < b.words; ++w) {
    for (uint32_t bits = mask_word(b, o, w); bits; bits &= bits - 1, ++q) {
      if (q >= cr.hi) return;
      const int k = 32 * w + ctz32(bits);
      acc_t v = acc_t(0);
      for (int64_t s = 0; s < seg; ++s) v += gbp[((s0 + s) * out + o) * b.rank + k];
      atomicAdd(gacc + vs + q, v * scale);
    }
  }
}

}  // namespace

template <typename scalar_t>
void launch_batched_shrink_b(const scalar_t* gy, int64_t T, const BatchedPool& p,
                             const scalar_t* values, const TilePlan& plan, int64_t grid_tiles,
                             int splits, int64_t chunks_per_split, acc_type_t<scalar_t>* partial,
                             cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(grid_tiles), static_cast<unsigned>(splits));
  TORCH_INTERNAL_ASSERT((plan.tile == kSmallTile || !std::is_same_v<scalar_t, double>),
                        "batched shrink_b: tile ", plan.tile, " for double");
  LORI_TILE_SWITCH(plan.tile, (!std::is_same_v<scalar_t, double>), TILE, [&] {
    batched_shrink_b_kernel<scalar_t, TILE>
        <<<grid, kThreads, 0, stream>>>(gy, T, p, values, plan, chunks_per_split, partial);
  });
  LORI_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_batched_expand_a(const acc_type_t<scalar_t>* partial, int splits, int64_t T,
                             int64_t in, const BatchedPool& p, const TilePlan& plan,
                             int64_t grid_tiles, scalar_t* gx, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(grid_tiles),
                  static_cast<unsigned>(ceil_div(in, kAColTile)));
  const size_t smem = static_cast<size_t>(plan.tile) * p.rank * sizeof(acc_type_t<scalar_t>);
  LORI_TILE_SWITCH(plan.tile, true, TILE, [&] {
    auto kernel = &batched_expand_a_kernel<scalar_t, TILE>;
    raise_dynamic_smem<acc_type_t<scalar_t>>(kernel, plan.tile, smem);
    kernel<<<grid, kThreads, smem, stream>>>(partial, splits, T, in, p, plan, gx);
  });
  LORI_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_batched_grad_values(const scalar_t* gy, const acc_type_t<scalar_t>* h, int64_t T,
                                const BatchedPool& p, const TilePlan& plan, int64_t grid_tiles,
                                acc_type_t<scalar_t>* gbp, acc_type_t<scalar_t>* gacc,
                                cudaStream_t stream) {
  (void)T;
  const dim3 grid(static_cast<unsigned>(grid_tiles), static_cast<unsigned>(p.chunks));
  batched_grad_b_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(gy, h, p, plan, gbp, gacc);
  LORI_LAUNCH_CHECK();
  if (plan.max_slots == 0) return;  // no multi-tile group
  batched_gather_grad_kernel<acc_type_t<scalar_t>>
      <<<grid, kRowChunk, 0, stream>>>(gbp, p, plan, gacc);
  LORI_LAUNCH_CHECK();
}

#define LORI_INSTANTIATE(scalar_t)                                                              \
  template void launch_batched_shrink_b<scalar_t>(const scalar_t*, int64_t, const BatchedPool&, \
                                                  const scalar_t*, const TilePlan&, int64_t,    \
                                                  int, int64_t, acc_type_t<scalar_t>*,          \
                                                  cudaStream_t);                                \
  template void launch_batched_expand_a<scalar_t>(const acc_type_t<scalar_t>*, int, int64_t,    \
                                                  int64_t, const BatchedPool&, const TilePlan&, \
                                                  int64_t, scalar_t*, cudaStream_t);            \
  template void launch_batched_grad_values<scalar_t>(                                           \
      const scalar_t*, const acc_type_t<scalar_t>*, int64_t, const BatchedPool&,                \
      const TilePlan&, int64_t, acc_type_t<scalar_t>*, acc_type_t<scalar_t>*, cudaStream_t);
LORI_INSTANTIATE(float)
LORI_INSTANTIATE(double)
LORI_INSTANTIATE(c10::Half)
LORI_INSTANTIATE(c10::BFloat16)
#undef LORI_INSTANTIATE

}  // namespace lori::cuda

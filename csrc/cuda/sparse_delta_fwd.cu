// CUDA forward of sparse_delta: y = scale * (x @ A^T) @ B^T, in two kernels (three in prefill).
//
// 1. shrink_a: partial[s, t, r] = sum_{j in slice s} x[t, j] A[r, j]. Grid (token tiles,
//    column slices): the in_features reduction is split across blocks (decode: T <= 16 gives
//    one token tile, so the slices are what fills the GPU). Each block generates its A tile
//    (32 ranks x 64 columns) into shared memory once per 64 columns and reuses it for all the
//    tile's tokens (16 for decode, 64 for prefill); A never reaches global memory.
//    bf16/fp16 prefill (T > 16, rank <= 64) with Rademacher A takes shrink_a_mma: 64 tokens x
//    rank on tensor cores (wmma bf16/fp16 -> fp32), A as exact +-1 units in the tile and its
//    magnitude applied in fp32 in the epilogue; x tiles are loaded one step ahead. Uniform A
//    stays on the SIMT kernel: its units would round to bf16/fp16 in the tile, and h (which
//    sparse_delta_fwd returns for grad_values) must come from A's fp32 values.
// 2. Prefill only: the S partials are summed once (at::sum over dim 0, fixed order).
// 3. expand_b: grid (token tiles, groups of up to 4 64-row chunks of B). Sums the partials into
//    h in shared memory (decode), then each thread owns one output row o and a quarter of the
//    tile's tokens, walks o's mask bits once and for each entry (o, k, v) does
//    acc[t] += v * h[t, k]: B is read in its compact form, y written once, coalesced.
//    bf16/fp16 prefill with rank <= 64 takes expand_b_mma instead: each chunk of B decoded
//    from the bitmask into a dense shared tile and multiplied on tensor cores.
#include <mma.h>

#include "common.cuh"

namespace lori::cuda {
namespace {

constexpr int kALd = kAColTile + 8;  // padded row of an A tile: conflict-free reads

// ---- shrink_a (SIMT) --------------------------------------------------------------------------
// Thread (r = tid / 8, js = tid % 8): rank r of the group, columns js, js + 8, ... of the tile,
// all TT tokens; the 8 js lanes of a rank are adjacent in a warp and reduce by shuffles.
template <typename scalar_t, int TT>
__global__ void __launch_bounds__(kThreads)
    shrink_a_kernel(const scalar_t* __restrict__ x, int64_t T, int64_t in, AGen g, int rank,
                    int64_t slice_cols, acc_type_t<scalar_t>* __restrict__ partial) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t xs[TT][kAColTile];
  __shared__ acc_t as[kRGroup * kALd];
  __shared__ uint32_t words_s[kRGroup * 4];
  const int tid = threadIdx.x, r = tid >> 3, js = tid & 7;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TT;
  const int64_t s = blockIdx.y;
  const int64_t c_begin = s * slice_cols;
  const int64_t c_end = c_begin + slice_cols < in ? c_begin + slice_cols : in;
  const int nt = T - t0 < TT ? static_cast<int>(T - t0) : TT;
  for (int r0 = 0; r0 < rank; r0 += kRGroup) {
    acc_t acc[TT];
#pragma unroll
    for (int t = 0; t < TT; ++t) acc[t] = acc_t(0);
    for (int64_t c0 = c_begin; c0 < c_end; c0 += kAColTile) {
      __syncthreads();  // readers of the previous xs are done
      for (int e = tid; e < TT * kAColTile; e += kThreads) {
        const int t = e / kAColTile, j = e % kAColTile;
        const int64_t col = c0 + j;
        xs[t][j] = (t < nt && col < c_end) ? load_acc<acc_t>(x + (t0 + t) * in + col) : acc_t(0);
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
      if (js == 0 && t < nt && r0 + r < rank) partial[(s * T + t0 + t) * rank + r0 + r] = v;
    }
  }
}

// ---- shrink_a_mma (tensor cores, bf16/fp16) --------------------------------------------------
constexpr int kMmaLd = kAColTile + 8;  // 144 bytes: 16-byte rows, 32-byte fragment starts

// Block: 64 tokens x RP ranks (RP = rank rounded up to 32, <= 64) over one column slice.
// Per 64-column step: the x tile's loads (16 bytes per thread-load, held in registers) are
// issued one step ahead, so they are in flight while the previous tile's mma runs and this
// step's A tile (+-1 units, exact in bf16/fp16) is generated; then each warp does 16 tokens x
// RP with 4 k-steps of 16x16x16 wmma. The products x * (+-1) are exact and accumulate in fp32;
// the epilogue multiplies by A's fp32 magnitude. Rademacher only (the launcher declines
// uniform A).
template <typename scalar_t, int RP>
__global__ void __launch_bounds__(kMmaThreads)
    shrink_a_mma_kernel(const scalar_t* __restrict__ x, int64_t T, int64_t in, AGen g, int rank,
                        int64_t slice_cols, float* __restrict__ partial) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using mt = typename MmaType<scalar_t>::type;
  __shared__ __align__(32) mt xs[kMmaTM * kMmaLd];
  __shared__ __align__(32) mt as[RP * kMmaLd];
  __shared__ __align__(32) float os[kMmaTM * (RP + 4)];
  __shared__ uint32_t words_s[RP * 4];
  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kMmaTM;
  const int64_t s = blockIdx.y;
  const int64_t c_begin = s * slice_cols;
  const int64_t c_end = c_begin + slice_cols < in ? c_begin + slice_cols : in;
  const mt* xm = reinterpret_cast<const mt*>(x);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[RP / 16];
#pragma unroll
  for (int n = 0; n < RP / 16; ++n) wmma::fill_fragment(acc[n], 0.f);

  constexpr int kLoads = kMmaTM * (kAColTile / 8) / kMmaThreads;  // uint4 per thread
  uint4 xv[kLoads];
  auto load_x = [&](int64_t c0) {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int e = tid + kMmaThreads * i, t = e >> 3, q = e & 7;
      const int64_t col = c0 + 8 * q;
      xv[i] = (c0 < c_end && t0 + t < T && col < c_end)
                  ? __ldg(reinterpret_cast<const uint4*>(xm + (t0 + t) * in + col))
                  : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  load_x(c_begin);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kAColTile) {
    __syncthreads();  // readers of the previous tiles are done
    gen_a_units_mma<scalar_t, RP>(g, rank, c0, as, kMmaLd, words_s);
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int e = tid + kMmaThreads * i, t = e >> 3, q = e & 7;
      *reinterpret_cast<uint4*>(xs + t * kMmaLd + 8 * q) = xv[i];
    }
    __syncthreads();
    load_x(c0 + kAColTile);  // the next tile's loads fly during this tile's mma and A tile
#pragma unroll
    for (int kk = 0; kk < kAColTile; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, mt, wmma::row_major> af;
      wmma::load_matrix_sync(af, xs + warp * 16 * kMmaLd + kk, kMmaLd);
#pragma unroll
      for (int n = 0; n < RP / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, mt, wmma::col_major> bf;
        wmma::load_matrix_sync(bf, as + n * 16 * kMmaLd + kk, kMmaLd);
        wmma::mma_sync(acc[n], af, bf, acc[n]);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < RP / 16; ++n) {
    wmma::store_matrix_sync(os + warp * 16 * (RP + 4) + n * 16, acc[n], RP + 4,
                            wmma::mem_row_major);
  }
  __syncthreads();
  for (int e = tid; e < kMmaTM * RP; e += kMmaThreads) {
    const int t = e / RP, r = e % RP;
    if (t0 + t < T && r < rank) partial[(s * T + t0 + t) * rank + r] = os[t * (RP + 4) + r] * g.mag;
  }
#endif
}

// ---- expand_b -----------------------------------------------------------------------------------
// Thread (ol = tid % 64, tg = tid / 64): output row c * 64 + ol, tokens tg, tg + 4, ... of the
// tile. A warp is 32 consecutive rows of one token group: y stores are coalesced.
template <typename scalar_t, int TT>
__global__ void __launch_bounds__(kThreads)
    expand_b_kernel(const acc_type_t<scalar_t>* __restrict__ partial, int splits, int64_t T,
                    BMask b, const scalar_t* __restrict__ values, acc_type_t<scalar_t> scale,
                    int64_t chunks_per_block, scalar_t* __restrict__ y) {
  using acc_t = acc_type_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* hs = reinterpret_cast<acc_t*>(smem_raw);  // [TT][rank]
  __shared__ int rs[kRowChunk + 1];
  constexpr int kTpt = TT / 4;
  const int tid = threadIdx.x, rank = b.rank;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TT;
  const int nt = T - t0 < TT ? static_cast<int>(T - t0) : TT;
  sum_partials<TT>(partial, splits, T, t0, nt, rank, acc_t(1), hs);
  const int64_t nch = num_chunks(b.out);
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * chunks_per_block;
  const int64_t c_end = c_begin + chunks_per_block < nch ? c_begin + chunks_per_block : nch;
  const int ol = tid % kRowChunk, tg = tid / kRowChunk;
  for (int64_t c = c_begin; c < c_end; ++c) {
    chunk_row_starts(b, c, rs);  // syncs: hs and rs ready
    const ChunkRange cr = chunk_range(b, c);
    const int64_t o = c * kRowChunk + ol;
    if (o >= b.out) continue;
    acc_t acc[kTpt];
#pragma unroll
    for (int i = 0; i < kTpt; ++i) acc[i] = acc_t(0);
    int64_t p = cr.lo + rs[ol];
    for (int w = 0; w < b.words; ++w) {
      for (uint32_t bits = mask_word(b, o, w); bits; bits &= bits - 1, ++p) {
        if (p >= cr.hi) break;
        const int k = 32 * w + ctz32(bits);
        const acc_t v = load_acc<acc_t>(values + p);
#pragma unroll
        for (int i = 0; i < kTpt; ++i) acc[i] += v * hs[(tg + 4 * i) * rank + k];
      }
    }
#pragma unroll
    for (int i = 0; i < kTpt; ++i) {
      const int t = tg + 4 * i;
      if (t < nt) y[(t0 + t) * b.out + o] = from_acc<scalar_t>(acc[i] * scale);
    }
  }
}

// ---- expand_b_mma (tensor cores, bf16/fp16 prefill) ---------------------------------------------
// "Load as sparse, compute as dense": per 64-row chunk, 64 threads decode B's rows from the
// bitmask form into a dense RP-wide shared tile (exact: B's values are already bf16/fp16),
// then each warp multiplies 16 tokens of h (rounded once to bf16/fp16, as a bf16 F.linear
// would) by the chunk on tensor cores; the 64 x 64 fp32 result is scaled, rounded and stored
// coalesced. h (T, rank) fp32 is summed beforehand. Block: 64 tokens x chunks_per_block chunks.
template <typename scalar_t, int RP>
__global__ void __launch_bounds__(kMmaThreads)
    expand_b_mma_kernel(const float* __restrict__ h, int64_t T, BMask b,
                        const scalar_t* __restrict__ values, float scale,
                        int64_t chunks_per_block, scalar_t* __restrict__ y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using mt = typename MmaType<scalar_t>::type;
  constexpr int kLd = RP + 8;        // 16-byte rows, 32-byte fragment starts, no bank conflicts
  constexpr int kOLd = kRowChunk + 4;
  __shared__ __align__(32) mt hs[kMmaTM * kLd];
  __shared__ __align__(32) mt bd[kRowChunk * kLd];
  __shared__ __align__(32) float os[kMmaTM * kOLd];
  __shared__ int rs[kRowChunk + 1];
  const int tid = threadIdx.x, warp = tid >> 5, rank = b.rank;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kMmaTM;
  const int nt = T - t0 < kMmaTM ? static_cast<int>(T - t0) : kMmaTM;
  const mt zero = MmaType<scalar_t>::from_float(0.f);
  for (int e = tid; e < kMmaTM * RP; e += kMmaThreads) {
    const int t = e / RP, k = e % RP;
    hs[t * kLd + k] = (t < nt && k < rank) ? MmaType<scalar_t>::from_float(h[(t0 + t) * rank + k])
                                           : zero;
  }
  const int64_t nch = num_chunks(b.out);
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * chunks_per_block;
  const int64_t c_end = c_begin + chunks_per_block < nch ? c_begin + chunks_per_block : nch;
  for (int64_t c = c_begin; c < c_end; ++c) {
    chunk_row_starts(b, c, rs);  // syncs first: readers of bd / os are done; hs ready
    decode_b_chunk_mma<scalar_t, RP>(b, values, c, rs, bd, kLd);
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kRowChunk / 16];
#pragma unroll
    for (int n = 0; n < kRowChunk / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
#pragma unroll
    for (int kk = 0; kk < RP; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, mt, wmma::row_major> af;
      wmma::load_matrix_sync(af, hs + warp * 16 * kLd + kk, kLd);
#pragma unroll
      for (int n = 0; n < kRowChunk / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, mt, wmma::col_major> bf;
        wmma::load_matrix_sync(bf, bd + n * 16 * kLd + kk, kLd);
        wmma::mma_sync(acc[n], af, bf, acc[n]);
      }
    }
#pragma unroll
    for (int n = 0; n < kRowChunk / 16; ++n) {
      wmma::store_matrix_sync(os + warp * 16 * kOLd + n * 16, acc[n], kOLd, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = tid; e < kMmaTM * kRowChunk; e += kMmaThreads) {
      const int t = e / kRowChunk, ol = e % kRowChunk;
      const int64_t o = c * kRowChunk + ol;
      if (t < nt && o < b.out) {
        y[(t0 + t) * b.out + o] = static_cast<scalar_t>(os[t * kOLd + ol] * scale);
      }
    }
  }
#endif
}

}  // namespace

template <typename scalar_t>
void launch_shrink_a(const scalar_t* x, int64_t T, int64_t in, const AGen& g, int rank,
                     int splits, int64_t slice_cols, int tile, acc_type_t<scalar_t>* partial,
                     cudaStream_t stream) {
  // A 64-token tile of doubles would not fit in static shared memory: double uses 16.
  if (std::is_same_v<scalar_t, double>) tile = kSmallTile;
  const dim3 grid(static_cast<unsigned>(ceil_div(T, tile)), static_cast<unsigned>(splits));
  LORI_TILE_SWITCH(tile, (!std::is_same_v<scalar_t, double>), TILE, [&] {
    shrink_a_kernel<scalar_t, TILE>
        <<<grid, kThreads, 0, stream>>>(x, T, in, g, rank, slice_cols, partial);
  });
  LORI_LAUNCH_CHECK();
}

template <typename scalar_t>
bool launch_shrink_a_mma(const scalar_t* x, int64_t T, int64_t in, const AGen& g, int rank,
                         int splits, int64_t slice_cols, acc_type_t<scalar_t>* partial,
                         cudaStream_t stream) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    if (g.dist != kRademacher || rank > 64 || in % 8 != 0 ||
        reinterpret_cast<uintptr_t>(x) % 16 != 0) {
      return false;
    }
    const dim3 grid(static_cast<unsigned>(ceil_div(T, kMmaTM)), static_cast<unsigned>(splits));
    LORI_RANK_PAD_SWITCH(rank, RP, [&] {
      shrink_a_mma_kernel<scalar_t, RP>
          <<<grid, kMmaThreads, 0, stream>>>(x, T, in, g, rank, slice_cols, partial);
    });
    LORI_LAUNCH_CHECK();
    return true;
  } else {
    return false;
  }
}

template <typename scalar_t>
void launch_expand_b(const acc_type_t<scalar_t>* partial, int splits, int64_t T,
                     const BMask& b, const scalar_t* values, double scale, int tile,
                     int64_t chunks_per_block, scalar_t* y, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(T, tile)),
                  static_cast<unsigned>(ceil_div(num_chunks(b.out), chunks_per_block)));
  const size_t smem = static_cast<size_t>(tile) * b.rank * sizeof(acc_type_t<scalar_t>);
  LORI_TILE_SWITCH(tile, true, TILE, [&] {
    auto kernel = &expand_b_kernel<scalar_t, TILE>;
    raise_dynamic_smem<acc_type_t<scalar_t>>(kernel, tile, smem);
    kernel<<<grid, kThreads, smem, stream>>>(partial, splits, T, b, values, scale,
                                             chunks_per_block, y);
  });
  LORI_LAUNCH_CHECK();
}

template <typename scalar_t>
bool launch_expand_b_mma(const float* h, int64_t T, const BMask& b, const scalar_t* values,
                         double scale, int64_t chunks_per_block, scalar_t* y,
                         cudaStream_t stream) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    if (b.rank > 64) return false;
    const dim3 grid(static_cast<unsigned>(ceil_div(T, kMmaTM)),
                    static_cast<unsigned>(ceil_div(num_chunks(b.out), chunks_per_block)));
    LORI_RANK_PAD_SWITCH(b.rank, RP, [&] {
      expand_b_mma_kernel<scalar_t, RP><<<grid, kMmaThreads, 0, stream>>>(
          h, T, b, values, static_cast<float>(scale), chunks_per_block, y);
    });
    LORI_LAUNCH_CHECK();
    return true;
  } else {
    return false;
  }
}

#define LORI_INSTANTIATE(scalar_t)                                                             \
  template void launch_shrink_a<scalar_t>(const scalar_t*, int64_t, int64_t, const AGen&, int, \
                                          int, int64_t, int, acc_type_t<scalar_t>*,            \
                                          cudaStream_t);                                       \
  template bool launch_shrink_a_mma<scalar_t>(const scalar_t*, int64_t, int64_t, const AGen&,  \
                                              int, int, int64_t, acc_type_t<scalar_t>*,        \
                                              cudaStream_t);                                   \
  template bool launch_expand_b_mma<scalar_t>(const float*, int64_t, const BMask&,            \
                                              const scalar_t*, double, int64_t, scalar_t*,     \
                                              cudaStream_t);                                   \
  template void launch_expand_b<scalar_t>(const acc_type_t<scalar_t>*, int, int64_t,           \
                                          const BMask&, const scalar_t*, double, int, int64_t, \
                                          scalar_t*, cudaStream_t);
LORI_INSTANTIATE(float)
LORI_INSTANTIATE(double)
LORI_INSTANTIATE(c10::Half)
LORI_INSTANTIATE(c10::BFloat16)
#undef LORI_INSTANTIATE

}  // namespace lori::cuda

// CUDA backward of sparse_delta.
//   gh = scale * gy @ B            (T, R)   shrink_b + expand_a -> grad_x = gh @ A
//   grad_values[(o, k)] = scale * sum_t gy[t, o] h[t, k],   h = x @ A^T (shrink_a, recomputed)
//
// SIMT kernels (fp32/fp64, decode, rank > 64, unaligned rows):
// shrink_b: grid (token tiles, groups of 64-row chunks); the out_features reduction is split
//   across blocks into (S, T, R) partials. Per chunk the block decodes 64 rows x 32 ranks of B
//   (one mask word per row) into a dense shared tile and multiplies it with the gy tile.
// expand_a: grid (64-column tiles of A, token tiles): sums the partials into gh (shared), then
//   generates A 32 ranks x 64 columns at a time into shared memory (never global) and reuses
//   each tile for all the tile's tokens; grad_x written once, coalesced.
// grad_values: grid (chunks, token slices): dense 64 x 32 blocks of gy^T h per mask word,
//   (S, OUT, R) partials, then a gather kernel writes only the pattern's entries.
// Tensor-core kernels (bf16/fp16 prefill, rank <= 64), same structure with wmma 16x16x16 and
// 64-token (or 64-row) tiles: shrink_b_mma (gy tile x B chunk decoded dense), expand_a_mma
// (gh x A unit tiles, magnitude in the fp32 epilogue), grad_b_mma (gy^T as a column-major view
// of the gy tile, x h); the partials between them are summed once (at::sum, fixed order).
#include <mma.h>

#include "common.cuh"

namespace lori::cuda {
namespace {

constexpr int kALd = kAColTile + 8;
constexpr int kBLd = kRGroup + 1;  // decoded B rows: conflict-free column reads

// Thread (r = tid % 32, ts = tid / 32): rank 32 g + r, tokens ts, ts + 8, ... of the tile.
template <typename scalar_t, int TT>
__global__ void __launch_bounds__(kThreads)
    shrink_b_kernel(const scalar_t* __restrict__ gy, int64_t T, BMask b,
                    const scalar_t* __restrict__ values, int64_t chunks_per_split,
                    acc_type_t<scalar_t>* __restrict__ partial) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t gys[TT][kRowChunk];
  __shared__ acc_t bd[kRowChunk * kBLd];
  __shared__ int rs[kRowChunk + 1];
  constexpr int kTpt = TT / 8;
  const int tid = threadIdx.x, r = tid & 31, ts = tid >> 5;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TT, s = blockIdx.y;
  const int nt = T - t0 < TT ? static_cast<int>(T - t0) : TT;
  const int64_t nch = num_chunks(b.out);
  const int64_t c_begin = s * chunks_per_split;
  const int64_t c_end = c_begin + chunks_per_split < nch ? c_begin + chunks_per_split : nch;
  for (int g = 0; g < b.words; ++g) {
    acc_t acc[kTpt];
#pragma unroll
    for (int i = 0; i < kTpt; ++i) acc[i] = acc_t(0);
    for (int64_t c = c_begin; c < c_end; ++c) {
      chunk_row_starts(b, c, rs);  // syncs first: readers of gys / bd are done
      const ChunkRange cr = chunk_range(b, c);
      for (int e = tid; e < TT * kRowChunk; e += kThreads) {
        const int t = e / kRowChunk, ol = e % kRowChunk;
        const int64_t o = c * kRowChunk + ol;
        gys[t][ol] = (t < nt && o < b.out) ? load_acc<acc_t>(gy + (t0 + t) * b.out + o) : acc_t(0);
      }
      decode_b_chunk(b, values, c, rs, cr, g, bd, kBLd);
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
      if (t < nt && k < b.rank) partial[(s * T + t0 + t) * b.rank + k] = acc[i];
    }
  }
}

// Thread (j = tid % 64, ts = tid / 64): column c0 + j, tokens ts, ts + 4, ... of the tile.
template <typename scalar_t, int TT>
__global__ void __launch_bounds__(kThreads)
    expand_a_kernel(const acc_type_t<scalar_t>* __restrict__ partial, int splits, int64_t T,
                    int64_t in, AGen g, int rank, acc_type_t<scalar_t> scale, scalar_t* __restrict__ gx) {
  using acc_t = acc_type_t<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* ghs = reinterpret_cast<acc_t*>(smem_raw);  // [TT][rank]
  __shared__ acc_t as[kRGroup * kALd];
  __shared__ uint32_t words_s[kRGroup * 4];
  constexpr int kTpt = TT / 4;
  const int tid = threadIdx.x, j = tid % kAColTile, ts = tid / kAColTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kAColTile;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * TT;
  const int nt = T - t0 < TT ? static_cast<int>(T - t0) : TT;
  sum_partials<TT>(partial, splits, T, t0, nt, rank, scale, ghs);
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
  const int64_t col = c0 + j;
  if (col >= in) return;
#pragma unroll
  for (int i = 0; i < kTpt; ++i) {
    const int t = ts + 4 * i;
    if (t < nt) gx[(t0 + t) * in + col] = from_acc<scalar_t>(acc[i]);
  }
}

constexpr int kGbTokens = 32;  // tokens per shared-memory step of grad_b

// Thread (ol = tid / 4, rq = tid % 4): row c * 64 + ol, ranks 32 g + 8 rq .. + 8.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    grad_b_kernel(const scalar_t* __restrict__ gy, const acc_type_t<scalar_t>* __restrict__ h,
                  int64_t T, BMask b, int64_t tokens_per_split,
                  acc_type_t<scalar_t>* __restrict__ gbp) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t gys[kGbTokens][kRowChunk];
  __shared__ acc_t hs[kGbTokens][kRGroup + 1];
  const int tid = threadIdx.x, ol = tid >> 2, rq = tid & 3;
  const int64_t c = blockIdx.x, s = blockIdx.y;
  const int64_t tb = s * tokens_per_split;
  const int64_t te = tb + tokens_per_split < T ? tb + tokens_per_split : T;
  const int64_t o = c * kRowChunk + ol;
  for (int g = 0; g < b.words; ++g) {
    acc_t acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = acc_t(0);
    for (int64_t t0 = tb; t0 < te; t0 += kGbTokens) {
      __syncthreads();
      for (int e = tid; e < kGbTokens * kRowChunk; e += kThreads) {
        const int t = e / kRowChunk, cl = e % kRowChunk;
        const int64_t oo = c * kRowChunk + cl;
        gys[t][cl] = (t0 + t < te && oo < b.out) ? load_acc<acc_t>(gy + (t0 + t) * b.out + oo)
                                                 : acc_t(0);
      }
      for (int e = tid; e < kGbTokens * kRGroup; e += kThreads) {
        const int t = e / kRGroup, kk = e % kRGroup, k = kRGroup * g + kk;
        hs[t][kk] = (t0 + t < te && k < b.rank) ? h[(t0 + t) * b.rank + k] : acc_t(0);
      }
      __syncthreads();
#pragma unroll 4
      for (int t = 0; t < kGbTokens; ++t) {
        const acc_t gv = gys[t][ol];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += gv * hs[t][rq * 8 + i];
      }
    }
    if (o < b.out) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int k = kRGroup * g + rq * 8 + i;
        if (k < b.rank) gbp[(s * b.out + o) * b.rank + k] = acc[i];
      }
    }
  }
}

// Block of 64 threads per chunk, thread per row: grad_values[p] = scale * sum_s gbp[s, o, k].
template <typename scalar_t>
__global__ void __launch_bounds__(kRowChunk)
    gather_grad_values_kernel(const acc_type_t<scalar_t>* __restrict__ gbp, int splits, BMask b,
                              acc_type_t<scalar_t> scale, scalar_t* __restrict__ grad_values) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ int rs[kRowChunk + 1];
  const int64_t c = blockIdx.x;
  chunk_row_starts(b, c, rs);
  const ChunkRange cr = chunk_range(b, c);
  const int64_t o = c * kRowChunk + threadIdx.x;
  if (o >= b.out) return;
  int64_t p = cr.lo + rs[threadIdx.x];
  for (int w = 0; w < b.words; ++w) {
    for (uint32_t bits = mask_word(b, o, w); bits; bits &= bits - 1, ++p) {
      if (p >= cr.hi) return;
      const int k = 32 * w + ctz32(bits);
      acc_t v = acc_t(0);
      for (int s = 0; s < splits; ++s) v += gbp[(s * b.out + o) * b.rank + k];
      grad_values[p] = from_acc<scalar_t>(v * acc_t(scale));
    }
  }
}

// ---- tensor-core versions (bf16/fp16 prefill, rank <= 64; 4 warps x 16 tokens or rows) -------
constexpr int kTileLd = kRowChunk + 8;  // 64-wide bf16/fp16 tiles: 144-byte rows

// partial[s, t, k] = sum_{o in the split's chunks} gy[t, o] B[o, k]: per chunk, the gy tile
// (64 tokens x 64 rows, 16-byte loads) times B's chunk decoded dense from the bitmask.
template <typename scalar_t, int RP>
__global__ void __launch_bounds__(kMmaThreads)
    shrink_b_mma_kernel(const scalar_t* __restrict__ gy, int64_t T, BMask b,
                        const scalar_t* __restrict__ values, int64_t chunks_per_split,
                        float* __restrict__ partial) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using mt = typename MmaType<scalar_t>::type;
  constexpr int kBLdM = RP + 8;
  __shared__ __align__(32) mt gys[kMmaTM * kTileLd];
  __shared__ __align__(32) mt bd[kRowChunk * kBLdM];
  __shared__ __align__(32) float os[kMmaTM * (RP + 4)];
  __shared__ int rs[kRowChunk + 1];
  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kMmaTM, s = blockIdx.y;
  const int64_t nch = num_chunks(b.out);
  const int64_t c_begin = s * chunks_per_split;
  const int64_t c_end = c_begin + chunks_per_split < nch ? c_begin + chunks_per_split : nch;
  const mt* gm = reinterpret_cast<const mt*>(gy);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[RP / 16];
#pragma unroll
  for (int n = 0; n < RP / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
  for (int64_t c = c_begin; c < c_end; ++c) {
    chunk_row_starts(b, c, rs);  // syncs first: readers of gys / bd are done
#pragma unroll
    for (int i = 0; i < kMmaTM * (kRowChunk / 8) / kMmaThreads; ++i) {
      const int e = tid + kMmaThreads * i, t = e >> 3, q = e & 7;
      const int64_t o = c * kRowChunk + 8 * q;
      *reinterpret_cast<uint4*>(gys + t * kTileLd + 8 * q) =
          (t0 + t < T && o < b.out)
              ? __ldg(reinterpret_cast<const uint4*>(gm + (t0 + t) * b.out + o))
              : make_uint4(0u, 0u, 0u, 0u);
    }
    decode_b_chunk_mma<scalar_t, RP>(b, values, c, rs, bd, kBLdM);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kRowChunk; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, mt, wmma::row_major> af;
      wmma::load_matrix_sync(af, gys + warp * 16 * kTileLd + kk, kTileLd);
#pragma unroll
      for (int n = 0; n < RP / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, mt, wmma::row_major> bf;
        wmma::load_matrix_sync(bf, bd + kk * kBLdM + n * 16, kBLdM);
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
    const int t = e / RP, k = e % RP;
    if (t0 + t < T && k < b.rank) partial[(s * T + t0 + t) * b.rank + k] = os[t * (RP + 4) + k];
  }
#endif
}

// gx[t, j] = mag * sum_k (scale gh[t, k]) unit[k, j]: gh (T, rank) fp32 summed, rounded once
// to bf16/fp16; A's unit tiles generated per 64 columns (never global); tiles_per_block column
// tiles per block share the gh tile.
template <typename scalar_t, int RP>
__global__ void __launch_bounds__(kMmaThreads)
    expand_a_mma_kernel(const float* __restrict__ gh, int64_t T, int64_t in, AGen g, int rank,
                        float scale, int64_t tiles_per_block, scalar_t* __restrict__ gx) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using mt = typename MmaType<scalar_t>::type;
  constexpr int kHLd = RP + 8, kOLd = kAColTile + 4;
  __shared__ __align__(32) mt ghs[kMmaTM * kHLd];
  __shared__ __align__(32) mt as[RP * kTileLd];
  __shared__ __align__(32) float os[kMmaTM * kOLd];
  __shared__ uint32_t words_s[RP * 4];
  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kMmaTM;
  const int nt = T - t0 < kMmaTM ? static_cast<int>(T - t0) : kMmaTM;
  const mt zero = MmaType<scalar_t>::from_float(0.f);
  for (int e = tid; e < kMmaTM * RP; e += kMmaThreads) {
    const int t = e / RP, k = e % RP;
    ghs[t * kHLd + k] = (t < nt && k < rank)
                            ? MmaType<scalar_t>::from_float(gh[(t0 + t) * rank + k] * scale)
                            : zero;
  }
  const int64_t ntiles = ceil_div(in, kAColTile);
  const int64_t ct_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_block;
  const int64_t ct_end = ct_begin + tiles_per_block < ntiles ? ct_begin + tiles_per_block : ntiles;
  for (int64_t ct = ct_begin; ct < ct_end; ++ct) {
    const int64_t c0 = ct * kAColTile;
    __syncthreads();  // readers of as / os are done; ghs ready
    gen_a_units_mma<scalar_t, RP>(g, rank, c0, as, kTileLd, words_s);
    __syncthreads();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kAColTile / 16];
#pragma unroll
    for (int n = 0; n < kAColTile / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
#pragma unroll
    for (int kk = 0; kk < RP; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, mt, wmma::row_major> af;
      wmma::load_matrix_sync(af, ghs + warp * 16 * kHLd + kk, kHLd);
#pragma unroll
      for (int n = 0; n < kAColTile / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, mt, wmma::row_major> bf;
        wmma::load_matrix_sync(bf, as + kk * kTileLd + n * 16, kTileLd);
        wmma::mma_sync(acc[n], af, bf, acc[n]);
      }
    }
#pragma unroll
    for (int n = 0; n < kAColTile / 16; ++n) {
      wmma::store_matrix_sync(os + warp * 16 * kOLd + n * 16, acc[n], kOLd, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = tid; e < kMmaTM * kAColTile; e += kMmaThreads) {
      const int t = e / kAColTile, j = e % kAColTile;
      const int64_t col = c0 + j;
      if (t < nt && col < in) {
        gx[(t0 + t) * in + col] = static_cast<scalar_t>(os[t * kOLd + j] * g.mag);
      }
    }
  }
#endif
}

// gbp[s, o, k] = sum_{t in split s} gy[t, o] h[t, k] for the 64 rows of chunk blockIdx.x: gy^T
// (column-major view of the gy tile) times h rounded once to bf16/fp16, 64 tokens per step.
template <typename scalar_t, int RP>
__global__ void __launch_bounds__(kMmaThreads)
    grad_b_mma_kernel(const scalar_t* __restrict__ gy, const float* __restrict__ h, int64_t T,
                      BMask b, int64_t tokens_per_split, float* __restrict__ gbp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using mt = typename MmaType<scalar_t>::type;
  constexpr int kHLd = RP + 8;
  __shared__ __align__(32) mt gys[kMmaTM * kTileLd];
  __shared__ __align__(32) mt hs[kMmaTM * kHLd];
  __shared__ __align__(32) float os[kRowChunk * (RP + 4)];
  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t c = blockIdx.x, s = blockIdx.y;
  const int64_t tb = s * tokens_per_split;
  const int64_t te = tb + tokens_per_split < T ? tb + tokens_per_split : T;
  const mt* gm = reinterpret_cast<const mt*>(gy);
  const mt zero = MmaType<scalar_t>::from_float(0.f);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[RP / 16];
#pragma unroll
  for (int n = 0; n < RP / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
  for (int64_t t0 = tb; t0 < te; t0 += kMmaTM) {
    __syncthreads();  // readers of the previous tiles are done
#pragma unroll
    for (int i = 0; i < kMmaTM * (kRowChunk / 8) / kMmaThreads; ++i) {
      const int e = tid + kMmaThreads * i, t = e >> 3, q = e & 7;
      const int64_t o = c * kRowChunk + 8 * q;
      *reinterpret_cast<uint4*>(gys + t * kTileLd + 8 * q) =
          (t0 + t < te && o < b.out)
              ? __ldg(reinterpret_cast<const uint4*>(gm + (t0 + t) * b.out + o))
              : make_uint4(0u, 0u, 0u, 0u);
    }
    for (int e = tid; e < kMmaTM * RP; e += kMmaThreads) {
      const int t = e / RP, k = e % RP;
      hs[t * kHLd + k] = (t0 + t < te && k < b.rank)
                             ? MmaType<scalar_t>::from_float(h[(t0 + t) * b.rank + k])
                             : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kMmaTM; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, mt, wmma::col_major> af;  // gy^T
      wmma::load_matrix_sync(af, gys + kk * kTileLd + warp * 16, kTileLd);
#pragma unroll
      for (int n = 0; n < RP / 16; ++n) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, mt, wmma::row_major> bf;
        wmma::load_matrix_sync(bf, hs + kk * kHLd + n * 16, kHLd);
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
  for (int e = tid; e < kRowChunk * RP; e += kMmaThreads) {
    const int i = e / RP, k = e % RP;
    const int64_t o = c * kRowChunk + i;
    if (o < b.out && k < b.rank) gbp[(s * b.out + o) * b.rank + k] = os[i * (RP + 4) + k];
  }
#endif
}

}  // namespace

template <typename scalar_t>
void launch_shrink_b(const scalar_t* gy, int64_t T, const BMask& b, const scalar_t* values,
                     int splits, int64_t chunks_per_split, int tile,
                     acc_type_t<scalar_t>* partial, cudaStream_t stream) {
  if (std::is_same_v<scalar_t, double>) tile = kSmallTile;  // shared-memory budget
  const dim3 grid(static_cast<unsigned>(ceil_div(T, tile)), static_cast<unsigned>(splits));
  LORI_TILE_SWITCH(tile, (!std::is_same_v<scalar_t, double>), TILE, [&] {
    shrink_b_kernel<scalar_t, TILE>
        <<<grid, kThreads, 0, stream>>>(gy, T, b, values, chunks_per_split, partial);
  });
  LORI_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_expand_a(const acc_type_t<scalar_t>* partial, int splits, int64_t T, int64_t in,
                     const AGen& g, int rank, double scale, int tile, scalar_t* gx,
                     cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(in, kAColTile)),
                  static_cast<unsigned>(ceil_div(T, tile)));
  const size_t smem = static_cast<size_t>(tile) * rank * sizeof(acc_type_t<scalar_t>);
  LORI_TILE_SWITCH(tile, true, TILE, [&] {
    auto kernel = &expand_a_kernel<scalar_t, TILE>;
    raise_dynamic_smem<acc_type_t<scalar_t>>(kernel, tile, smem);
    kernel<<<grid, kThreads, smem, stream>>>(partial, splits, T, in, g, rank, scale, gx);
  });
  LORI_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_grad_values(const scalar_t* gy, const acc_type_t<scalar_t>* h, int64_t T,
                        const BMask& b, int splits, int64_t tokens_per_split, double scale,
                        acc_type_t<scalar_t>* gb_partial, scalar_t* grad_values,
                        cudaStream_t stream) {
  const unsigned nch = static_cast<unsigned>(num_chunks(b.out));
  grad_b_kernel<scalar_t><<<dim3(nch, static_cast<unsigned>(splits)), kThreads, 0, stream>>>(
      gy, h, T, b, tokens_per_split, gb_partial);
  LORI_LAUNCH_CHECK();
  gather_grad_values_kernel<scalar_t>
      <<<nch, kRowChunk, 0, stream>>>(gb_partial, splits, b, scale, grad_values);
  LORI_LAUNCH_CHECK();
}

namespace {
template <typename scalar_t>
constexpr bool kHasMma = std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;

bool mma_rows_ok(const void* p, int64_t row_elems) {
  return row_elems % 8 == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0;
}
}  // namespace

template <typename scalar_t>
bool launch_shrink_b_mma(const scalar_t* gy, int64_t T, const BMask& b, const scalar_t* values,
                         int splits, int64_t chunks_per_split, float* partial,
                         cudaStream_t stream) {
  if constexpr (kHasMma<scalar_t>) {
    if (b.rank > 64 || !mma_rows_ok(gy, b.out)) return false;
    const dim3 grid(static_cast<unsigned>(ceil_div(T, kMmaTM)), static_cast<unsigned>(splits));
    LORI_RANK_PAD_SWITCH(b.rank, RP, [&] {
      shrink_b_mma_kernel<scalar_t, RP>
          <<<grid, kMmaThreads, 0, stream>>>(gy, T, b, values, chunks_per_split, partial);
    });
    LORI_LAUNCH_CHECK();
    return true;
  } else {
    return false;
  }
}

template <typename scalar_t>
bool launch_expand_a_mma(const float* gh, int64_t T, int64_t in, const AGen& g, int rank,
                         double scale, int64_t tiles_per_block, scalar_t* gx,
                         cudaStream_t stream) {
  if constexpr (kHasMma<scalar_t>) {
    if (rank > 64) return false;
    const dim3 grid(static_cast<unsigned>(ceil_div(T, kMmaTM)),
                    static_cast<unsigned>(ceil_div(ceil_div(in, kAColTile), tiles_per_block)));
    const float sc = static_cast<float>(scale);
    LORI_RANK_PAD_SWITCH(rank, RP, [&] {
      expand_a_mma_kernel<scalar_t, RP>
          <<<grid, kMmaThreads, 0, stream>>>(gh, T, in, g, rank, sc, tiles_per_block, gx);
    });
    LORI_LAUNCH_CHECK();
    return true;
  } else {
    return false;
  }
}

template <typename scalar_t>
bool launch_grad_values_mma(const scalar_t* gy, const float* h, int64_t T, const BMask& b,
                            int splits, int64_t tokens_per_split, double scale, float* gb_partial,
                            scalar_t* grad_values, cudaStream_t stream) {
  if constexpr (kHasMma<scalar_t>) {
    if (b.rank > 64 || !mma_rows_ok(gy, b.out)) return false;
    const unsigned nch = static_cast<unsigned>(num_chunks(b.out));
    const dim3 grid(nch, static_cast<unsigned>(splits));
    LORI_RANK_PAD_SWITCH(b.rank, RP, [&] {
      grad_b_mma_kernel<scalar_t, RP>
          <<<grid, kMmaThreads, 0, stream>>>(gy, h, T, b, tokens_per_split, gb_partial);
    });
    LORI_LAUNCH_CHECK();
    gather_grad_values_kernel<scalar_t><<<nch, kRowChunk, 0, stream>>>(
        gb_partial, splits, b, static_cast<float>(scale), grad_values);
    LORI_LAUNCH_CHECK();
    return true;
  } else {
    return false;
  }
}

#define LORI_INSTANTIATE(scalar_t)                                                             \
  template void launch_shrink_b<scalar_t>(const scalar_t*, int64_t, const BMask&,              \
                                          const scalar_t*, int, int64_t, int,                  \
                                          acc_type_t<scalar_t>*, cudaStream_t);                \
  template void launch_expand_a<scalar_t>(const acc_type_t<scalar_t>*, int, int64_t, int64_t,  \
                                          const AGen&, int, double, int, scalar_t*,             \
                                          cudaStream_t);                                       \
  template bool launch_shrink_b_mma<scalar_t>(const scalar_t*, int64_t, const BMask&,         \
                                              const scalar_t*, int, int64_t, float*,           \
                                              cudaStream_t);                                   \
  template bool launch_expand_a_mma<scalar_t>(const float*, int64_t, int64_t, const AGen&, int,\
                                              double, int64_t, scalar_t*, cudaStream_t);       \
  template bool launch_grad_values_mma<scalar_t>(const scalar_t*, const float*, int64_t,       \
                                                 const BMask&, int, int64_t, double, float*,   \
                                                 scalar_t*, cudaStream_t);                     \
  template void launch_grad_values<scalar_t>(const scalar_t*, const acc_type_t<scalar_t>*,     \
                                             int64_t, const BMask&, int, int64_t, double,      \
                                             acc_type_t<scalar_t>*, scalar_t*, cudaStream_t);
LORI_INSTANTIATE(float)
LORI_INSTANTIATE(double)
LORI_INSTANTIATE(c10::Half)
LORI_INSTANTIATE(c10::BFloat16)
#undef LORI_INSTANTIATE

}  // namespace lori::cuda

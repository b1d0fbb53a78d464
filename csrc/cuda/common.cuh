// Device helpers shared by the CUDA kernels: dtype conversion, A tiles from the seed, B chunk
// decoding. The RNG and bit logic themselves come from the host+device headers in
// csrc/include/lori, so the CPU build tests the same lines.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cstdint>
#include <mutex>
#include <set>
#include <utility>

#include "kernels.cuh"
#include "static_switch.h"
#include "lori/bitmask.h"
#include "lori/philox.h"

namespace lori::cuda {

constexpr int kThreads = 256;  // every tile kernel runs 256 threads
constexpr int kRGroup = 32;    // rows of A (= ranks) per shared-memory tile: one mask word
constexpr int kAColTile = 64;  // columns of A per shared-memory tile (half a Rademacher block)

template <typename scalar_t>
struct MmaType;
template <>
struct MmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
  static __device__ __forceinline__ type from_float(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct MmaType<c10::Half> {
  using type = __half;
  static __device__ __forceinline__ type from_float(float v) { return __float2half_rn(v); }
};

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t load_acc(const scalar_t* p) {
  return static_cast<acc_t>(static_cast<acc_type_t<scalar_t>>(*p));
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t from_acc(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return v;
  } else {
    return static_cast<scalar_t>(static_cast<float>(v));  // round-to-nearest-even, as .to()
  }
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Mask word w of row o, with bits >= rank cleared (a corrupt mask cannot index past rank).
__device__ __forceinline__ uint32_t mask_word(const BMask& b, int64_t o, int w) {
  const uint32_t m = __ldg(b.mask + o * b.words + w);
  return w == b.words - 1 ? (m & last_word_valid_bits(b.rank)) : m;
}

// Valid value-index range of chunk c: [offsets[c], offsets[c+1]) clamped into [0, nnz).
struct ChunkRange {
  int64_t lo, hi;
};
__device__ __forceinline__ ChunkRange chunk_range(const BMask& b, int64_t c) {
  int64_t lo = __ldg(b.offsets + c), hi = __ldg(b.offsets + c + 1);
  lo = lo < 0 ? 0 : (lo > b.nnz ? b.nnz : lo);
  hi = hi < lo ? lo : (hi > b.nnz ? b.nnz : hi);
  return {lo, hi};
}

// rs[i] (i in [0, 64]) = entries in rows [row0, row0 + i) of the chunk (exclusive prefix of row
// popcounts); rows past OUT count 0. Needs >= 64 threads; all threads must call it (it syncs).
__device__ __forceinline__ void chunk_row_starts(const BMask& b, int64_t c, int* rs) {
  const int tid = threadIdx.x;
  __syncthreads();  // earlier readers of rs are done
  if (tid < kRowChunk) {
    const int64_t o = c * kRowChunk + tid;
    int cnt = 0;
    if (o < b.out) {
      for (int w = 0; w < b.words; ++w) cnt += popcount32(mask_word(b, o, w));
    }
    const int lane = tid & 31;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, cnt, d);
      if (lane >= d) cnt += v;
    }
    rs[tid + 1] = cnt;  // inclusive within the warp
    if (tid == 0) rs[0] = 0;
  }
  __syncthreads();
  if (tid >= 32 && tid < kRowChunk) rs[tid + 1] += rs[32];
  __syncthreads();
}

// Decodes rows [row0, row0 + 64) x ranks [32 g, 32 g + 32) of B into bd[i * ld + kk] (acc_t,
// zero off the pattern). rs from chunk_row_starts. Needs >= 64 threads; caller syncs after.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ void decode_b_chunk(const BMask& b, const scalar_t* values, int64_t c,
                                               const int* rs, ChunkRange cr, int g, acc_t* bd,
                                               int ld) {
  const int tid = threadIdx.x;
  if (tid >= kRowChunk) return;
  acc_t* row = bd + tid * ld;
#pragma unroll
  for (int kk = 0; kk < kRGroup; ++kk) row[kk] = acc_t(0);
  const int64_t o = c * kRowChunk + tid;
  if (o >= b.out || g >= b.words) return;
  int64_t p = cr.lo + rs[tid];
  for (int w = 0; w < g; ++w) p += popcount32(mask_word(b, o, w));
  for (uint32_t bits = mask_word(b, o, g); bits; bits &= bits - 1, ++p) {
    if (p >= cr.lo && p < cr.hi) row[ctz32(bits)] = load_acc<acc_t>(values + p);
  }
}

// Fills as[r * ld + j] (r < 32, j < 64) with A[r0 + r, g.col0 + c0 + j] / mag * g.mag (g.mag
// = 1: the unit), zero for rows >= rank. c0 must be a multiple of 64. words_s: 32 * 4 uint32
// scratch. All threads call it; it syncs before returning. A column window whose A columns
// do not start on a 64-column edge takes a slower per-element path (one Philox block per
// element), the price of an unaligned shard.
template <typename acc_t>
__device__ __forceinline__ void gen_a_tile(const AGen& g, int r0, int rank, int64_t c0, acc_t* as,
                                           int ld, uint32_t* words_s) {
  const int tid = threadIdx.x;
  __syncthreads();  // earlier readers of as / words_s are done
  c0 += g.col0;
  if ((c0 & (kAColTile - 1)) != 0) {
    for (int e = tid; e < kRGroup * kAColTile; e += blockDim.x) {
      const int r = e / kAColTile, j = e % kAColTile;
      as[r * ld + j] = r0 + r < rank
                           ? acc_t(a_element(g.k0, g.k1, g.dist, g.mag,
                                             static_cast<uint32_t>(r0 + r),
                                             static_cast<uint32_t>(c0 + j)))
                           : acc_t(0);
    }
  } else if (g.dist == kRademacher) {
    if (tid < kRGroup) {
      const U32x4 blk = a_block(g.k0, g.k1, g.dist, static_cast<uint32_t>(c0 >> 7),
                                static_cast<uint32_t>(r0 + tid));
#pragma unroll
      for (int i = 0; i < 4; ++i) words_s[tid * 4 + i] = blk.v[i];
    }
    __syncthreads();
    const int half = static_cast<int>((c0 >> 6) & 1);  // which 64 of the block's 128 bits
    for (int e = tid; e < kRGroup * kAColTile; e += blockDim.x) {
      const int r = e / kAColTile, j = e % kAColTile;
      const uint32_t w = words_s[r * 4 + half * 2 + (j >> 5)];
      const acc_t v = ((w >> (j & 31)) & 1u) ? acc_t(-g.mag) : acc_t(g.mag);
      as[r * ld + j] = r0 + r < rank ? v : acc_t(0);
    }
  } else {
    // One Philox block per 4 columns: 32 x 16 blocks per tile.
    for (int e = tid; e < kRGroup * (kAColTile / 4); e += blockDim.x) {
      const int r = e / (kAColTile / 4), q = e % (kAColTile / 4);
      acc_t* dst = as + r * ld + 4 * q;
      if (r0 + r < rank) {
        const U32x4 blk = a_block(g.k0, g.k1, g.dist, static_cast<uint32_t>((c0 >> 2) + q),
                                  static_cast<uint32_t>(r0 + r));
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[i] = acc_t(uniform_unit(blk.v[i]) * g.mag);
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[i] = acc_t(0);
      }
    }
  }
  __syncthreads();
}

// Tensor-core A tile: as[r * ld + j] (r < RP, j < 64) = the unit of A[r, g.col0 + c0 + j]
// (per element when the window's A columns are not on a 64-column edge) (+-1, exact;
// or the uniform unit rounded to bf16/fp16, 2^-9 relative error), zero for r >= rank; A's
// magnitude is left to the caller's fp32 epilogue. shrink_a_mma (whose h sparse_delta_fwd
// returns) calls it for Rademacher only; expand_a_mma (grad_x, rounded to bf16/fp16 anyway)
// for both. c0 a multiple of 64. words_s: RP * 4 scratch. All threads call it; it syncs
// between its phases but not before (the caller orders earlier readers) or after.
template <typename scalar_t, int RP>
__device__ __forceinline__ void gen_a_units_mma(const AGen& g, int rank, int64_t c0,
                                                typename MmaType<scalar_t>::type* as, int ld,
                                                uint32_t* words_s) {
  using mt = typename MmaType<scalar_t>::type;
  const int tid = threadIdx.x;
  const mt one = MmaType<scalar_t>::from_float(1.f), minus_one = MmaType<scalar_t>::from_float(-1.f),
           zero = MmaType<scalar_t>::from_float(0.f);
  c0 += g.col0;
  if ((c0 & (kAColTile - 1)) != 0) {
    __syncthreads();  // keep the two phases' barrier count of the paths below
    for (int e = tid; e < RP * kAColTile; e += blockDim.x) {
      const int r = e / kAColTile, j = e % kAColTile;
      as[r * ld + j] = r < rank ? MmaType<scalar_t>::from_float(a_element(
                                      g.k0, g.k1, g.dist, 1.f, static_cast<uint32_t>(r),
                                      static_cast<uint32_t>(c0 + j)))
                                : zero;
    }
  } else if (g.dist == kRademacher) {
    if (tid < RP) {
      const U32x4 blk = a_block(g.k0, g.k1, g.dist, static_cast<uint32_t>(c0 >> 7),
                                static_cast<uint32_t>(tid));
#pragma unroll
      for (int i = 0; i < 4; ++i) words_s[tid * 4 + i] = blk.v[i];
    }
    __syncthreads();
    const int half = static_cast<int>((c0 >> 6) & 1);  // which 64 of the block's 128 bits
    for (int e = tid; e < RP * kAColTile; e += blockDim.x) {
      const int r = e / kAColTile, j = e % kAColTile;
      const uint32_t w = words_s[r * 4 + half * 2 + (j >> 5)];
      as[r * ld + j] = r < rank ? (((w >> (j & 31)) & 1u) ? minus_one : one) : zero;
    }
  } else {
    for (int e = tid; e < RP * (kAColTile / 4); e += blockDim.x) {
      const int r = e / (kAColTile / 4), q = e % (kAColTile / 4);
      mt* dst = as + r * ld + 4 * q;
      if (r < rank) {
        const U32x4 blk = a_block(g.k0, g.k1, g.dist, static_cast<uint32_t>((c0 >> 2) + q),
                                  static_cast<uint32_t>(r));
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[i] = MmaType<scalar_t>::from_float(uniform_unit(blk.v[i]));
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[i] = zero;
      }
    }
  }
}

// Tensor-core B tile: bd[i * ld + k] (i < 64 rows of chunk c, k < RP) = B[64 c + i, k] in the
// I/O dtype (exact), zero off the pattern. Threads >= 64 idle; caller syncs after.
template <typename scalar_t, int RP>
__device__ __forceinline__ void decode_b_chunk_mma(const BMask& b, const scalar_t* values,
                                                   int64_t c, const int* rs,
                                                   typename MmaType<scalar_t>::type* bd, int ld) {
  using mt = typename MmaType<scalar_t>::type;
  const int tid = threadIdx.x;
  if (tid >= kRowChunk) return;
  mt* row = bd + tid * ld;
  const mt zero = MmaType<scalar_t>::from_float(0.f);
#pragma unroll
  for (int k = 0; k < RP; ++k) row[k] = zero;
  const int64_t o = c * kRowChunk + tid;
  if (o >= b.out) return;
  const mt* vm = reinterpret_cast<const mt*>(values);
  const ChunkRange cr = chunk_range(b, c);
  int64_t p = cr.lo + rs[tid];
  for (int w = 0; w < b.words; ++w) {
    for (uint32_t bits = mask_word(b, o, w); bits; bits &= bits - 1, ++p) {
      if (p < cr.hi) row[32 * w + ctz32(bits)] = vm[p];
    }
  }
}

// hs[t * rank + k] = mult * sum_s partial[s, t0 + t, k] for t < nt, 0 for nt <= t < TT.
// Up to 8 adjacent lanes share one element (strided over s, then combined by shuffles), so
// decode (one token, many splits) keeps several loads in flight per element. The order of the
// additions is fixed: results do not depend on scheduling. Callers sync before reading hs.
template <int TT, typename acc_t>
__device__ __forceinline__ void sum_partials(const acc_t* __restrict__ partial, int splits,
                                             int64_t T, int64_t t0, int nt, int rank, acc_t mult,
                                             acc_t* hs) {
  const int tid = threadIdx.x, ne = nt * rank;
  int lanes = 1;
  while (lanes < 8 && lanes * 2 * ne <= static_cast<int>(blockDim.x)) lanes *= 2;
  for (int base = 0; base < ne * lanes; base += blockDim.x) {  // uniform trip count: shuffles ok
    const int idx = base + tid, e = idx / lanes, sub = idx % lanes;
    acc_t v = acc_t(0);
    if (e < ne) {
      const acc_t* p = partial + (t0 * rank + e);
#pragma unroll 8
      for (int s = sub; s < splits; s += lanes) v += p[static_cast<int64_t>(s) * T * rank];
    }
    for (int d = 1; d < lanes; d <<= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
    if (e < ne && sub == 0) hs[e] = v * mult;
  }
  for (int e = ne + tid; e < TT * rank; e += blockDim.x) hs[e] = acc_t(0);
}

// ---- batched multi-adapter helpers (kernels.cuh: BatchedPool, TilePlan) ----------------------
struct Tile {
  int64_t group;  // adapter, or >= N for the "no adapter" group
  int64_t start;  // sorted position of the tile's first token
  int len;        // tokens in the tile, clamped to [0, TT]
  int seg_tiles;  // > 0 on a group's first tile: the group's tile count
  int64_t slot;   // index among the tiles of multi-tile groups; -1 for a single-tile group
};

// Tile i of the plan, or len 0 (nothing to do) past the tile count. Block-uniform.
__device__ __forceinline__ Tile load_tile(const TilePlan& plan, int64_t i, int TT) {
  Tile t{0, 0, 0, 0, -1};
  if (i >= plan.max_tiles || i >= plan.tiles[kTileFields * plan.max_tiles]) return t;
  const int64_t* r = plan.tiles + kTileFields * i;
  const int64_t len = r[2];
  t.group = r[0];
  t.start = r[1];
  t.len = len < 0 ? 0 : (len > TT ? TT : static_cast<int>(len));
  t.seg_tiles = static_cast<int>(r[3]);
  t.slot = r[4];
  return t;
}

// Adapter a's B (0 <= a < N), its values extent clamped into the buffer: *vstart in
// [0, num_values] and nnz in [0, num_values - *vstart], so chunk_range keeps every value index
// of the adapter inside `values`.
__device__ __forceinline__ BMask adapter_bmask(const BatchedPool& p, int64_t a, int64_t* vstart) {
  int64_t vs = p.value_starts[a];
  vs = vs < 0 ? 0 : (vs > p.num_values ? p.num_values : vs);
  int64_t nnz = p.offsets[a * (p.chunks + 1) + p.chunks];
  nnz = nnz < 0 ? 0 : (nnz > p.num_values - vs ? p.num_values - vs : nnz);
  *vstart = vs;
  return BMask{p.masks + a * p.out * p.words, p.offsets + a * (p.chunks + 1), p.out, nnz,
               p.words, p.rank};
}

__device__ __forceinline__ AGen adapter_agen(const BatchedPool& p, int64_t a) {
  const uint64_t seed = static_cast<uint64_t>(p.seeds[a]);
  const bool uniform = p.dists[a] == kUniform;
  return AGen{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
              uniform ? static_cast<int>(kUniform) : static_cast<int>(kRademacher),
              uniform ? p.mag_uniform : p.mag_rademacher};
}

// toks[t] = perm[tile.start + t] for t < tile.len. Threads < TT; caller syncs before use.
template <int TT>
__device__ __forceinline__ void load_tile_tokens(const TilePlan& plan, const Tile& tl,
                                                 int64_t* toks) {
  const int t = threadIdx.x;
  if (t < TT) toks[t] = t < tl.len ? plan.perm[tl.start + t] : 0;
}

// The most dynamic shared memory (a (tile, rank) acc_t tile) a launcher requests for a
// `tile`-token kernel: 64-token tiles serve rank <= kLargeTileMaxRank only (token_tile,
// batched_tile), 16-token tiles any rank <= kMaxRank.
template <typename acc_t>
inline size_t max_tile_smem(int tile) {
  const int max_rank = tile == kLargeTile ? kLargeTileMaxRank : kMaxRank;
  return static_cast<size_t>(tile) * max_rank * sizeof(acc_t);
}

// Kernels whose dynamic shared memory (a (tokens, rank) tile) can pass the default 48 KB
// budget together with their static buffers. Sets the kernel's limit to the largest size its
// launcher can request (max_tile_smem), once per (kernel, device) under a lock, so a launch
// never depends on another thread's setting and costs no driver call after the first; checks
// that this launch's `bytes` fits.
template <typename acc_t, typename Kernel>
inline void raise_dynamic_smem(Kernel kernel, int tile, size_t bytes) {
  const size_t cap = max_tile_smem<acc_t>(tile);
  TORCH_INTERNAL_ASSERT(bytes <= cap, "dynamic shared memory ", bytes, " > ", cap,
                        " bytes for a ", tile, "-token tile");
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  const std::pair<const void*, int> key(reinterpret_cast<const void*>(kernel),
                                        static_cast<int>(c10::cuda::current_device()));
  const std::lock_guard<std::mutex> lock(mu);
  if (done.count(key) != 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(cap)));
  done.insert(key);
}

// Throws (through the launcher) on a launch error.
#define LORI_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

}  // namespace lori::cuda

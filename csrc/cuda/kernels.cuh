// Host-visible interface of the CUDA kernels: parameter structs and launchers.
//
// This header is plain C++ (no CUDA syntax) so the host-side op code (ops_cuda.cpp, compiled
// by the host compiler) can include it; the .cu files define and instantiate the launchers for
// scalar_t in {float, double, c10::Half, c10::BFloat16}. acc_t is float, double for double.
//
// Notation (shared by every kernel): T tokens, IN = in_features, OUT = out_features, R = rank.
//   A (R, IN) from the seed (lori/philox.h), B (OUT, R) in the bitmask form (lori/bitmask.h).
//   "partials" are (S, T, R) arrays of acc_t: partial sums over S slices of a reduction, summed
//   by the consumer kernel in a fixed order (results do not depend on scheduling).
#pragma once
#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

typedef struct CUstream_st* cudaStream_t;

namespace lori::cuda {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// A generator: element A[r, j] = unit(r, j) * mag, unit in {+-1} (Rademacher) or the spec's
// uniform_unit. mag = the spec's fp32 magnitude gives A's exact fp32 elements.
// col0: A's column of the kernel's column 0 (a column window, tensor parallelism); kernels
// address A's columns as col0 + their own.
struct AGen {
  uint32_t k0, k1;
  int dist;
  float mag;
  int64_t col0 = 0;
};

// B in the bitmask form. Trusted, not validated on the device (see ops_cuda.cpp): that the
// offsets match the mask's popcounts. Every kernel masks bits >= rank and clamps each chunk's
// value reads and writes to [offsets[c], offsets[c+1]) within [0, nnz), so a corrupt B gives
// wrong numbers, never an out-of-bounds access.
struct BMask {
  const uint32_t* mask;    // (OUT, words)
  const int32_t* offsets;  // (num_chunks(OUT) + 1,)
  int64_t out;
  int64_t nnz;
  int words;
  int rank;
};

// Tokens per block of the SIMT kernels: kSmallTile for decode (and for large ranks/double),
// kLargeTile for prefill (A tiles generated once per block serve this many tokens).
constexpr int kSmallTile = 16;
constexpr int kLargeTile = 64;
constexpr int kLargeTileMaxRank = 128;  // larger ranks (and float64) take kSmallTile
// Tensor-core (wmma, sm_80+) kernels: 4 warps of 16 tokens (or rows), bf16/fp16 in, fp32 acc.
constexpr int kMmaTM = 64;
constexpr int kMmaThreads = 128;

// ---- forward / shared pieces (sparse_delta_fwd.cu) --------------------------------------------
// partial[s, t, r] = sum_{j in slice s} x[t, j] * A[r, j]; slice s = columns
// [s * slice_cols, min(IN, (s + 1) * slice_cols)), slice_cols a multiple of 64.
template <typename scalar_t>
void launch_shrink_a(const scalar_t* x, int64_t T, int64_t in, const AGen& g, int rank,
                     int splits, int64_t slice_cols, int tile, acc_type_t<scalar_t>* partial,
                     cudaStream_t stream);

// y[t, o] = scale * sum_k B[o, k] * h[t, k], h[t, k] = sum_s partial[s, t, k]. Each block
// covers `tile` tokens and chunks_per_block 64-row chunks (h loaded once for all of them).
template <typename scalar_t>
void launch_expand_b(const acc_type_t<scalar_t>* partial, int splits, int64_t T,
                     const BMask& b, const scalar_t* values, double scale, int tile,
                     int64_t chunks_per_block, scalar_t* y, cudaStream_t stream);

// Tensor-core forward (bf16/fp16, rank <= 64, Rademacher A): same contract as launch_shrink_a
// with A's magnitude folded in (partial holds h itself). Returns false when it does not apply
// (uniform A included: its units are not exact in bf16/fp16).
template <typename scalar_t>
bool launch_shrink_a_mma(const scalar_t* x, int64_t T, int64_t in, const AGen& g, int rank,
                         int splits, int64_t slice_cols, acc_type_t<scalar_t>* partial,
                         cudaStream_t stream);

// Tensor-core expand (bf16/fp16, rank <= 64): y[t, o] = scale * sum_k B[o, k] * h[t, k] with
// h (T, rank) fp32 already summed, rounded once to the I/O dtype for the mma. Tiles of 64 tokens
// x chunks_per_block chunks. Returns false when it does not apply.
template <typename scalar_t>
bool launch_expand_b_mma(const float* h, int64_t T, const BMask& b, const scalar_t* values,
                         double scale, int64_t chunks_per_block, scalar_t* y,
                         cudaStream_t stream);

// ---- backward (sparse_delta_bwd.cu) -------------------------------------------------------------
// partial[s, t, k] = sum_{o in chunks [s * cps, (s + 1) * cps)} gy[t, o] * B[o, k].
template <typename scalar_t>
void launch_shrink_b(const scalar_t* gy, int64_t T, const BMask& b, const scalar_t* values,
                     int splits, int64_t chunks_per_split, int tile,
                     acc_type_t<scalar_t>* partial, cudaStream_t stream);

// gx[t, j] = scale * sum_k gh[t, k] * A[k, j], gh[t, k] = sum_s partial[s, t, k].
template <typename scalar_t>
void launch_expand_a(const acc_type_t<scalar_t>* partial, int splits, int64_t T, int64_t in,
                     const AGen& g, int rank, double scale, int tile, scalar_t* gx,
                     cudaStream_t stream);

// gb_partial[s, o, k] = sum_{t in token slice s} gy[t, o] * h[t, k] for every (o, k) (dense,
// acc_t, k < R), then grad_values[p] = scale * sum_s gb_partial[s, o, k] for pattern entry p.
template <typename scalar_t>
void launch_grad_values(const scalar_t* gy, const acc_type_t<scalar_t>* h, int64_t T,
                        const BMask& b, int splits, int64_t tokens_per_split, double scale,
                        acc_type_t<scalar_t>* gb_partial, scalar_t* grad_values,
                        cudaStream_t stream);

// Tensor-core versions for bf16/fp16 prefill (rank <= 64; gy rows 16-byte aligned). Same
// contracts as above with fp32 buffers; gh and h are (T, rank), already summed; the mma
// operands gh * scale and h are rounded once to the I/O dtype. Return false when they do not
// apply (the caller then runs the SIMT kernels).
template <typename scalar_t>
bool launch_shrink_b_mma(const scalar_t* gy, int64_t T, const BMask& b, const scalar_t* values,
                         int splits, int64_t chunks_per_split, float* partial,
                         cudaStream_t stream);
template <typename scalar_t>
bool launch_expand_a_mma(const float* gh, int64_t T, int64_t in, const AGen& g, int rank,
                         double scale, int64_t tiles_per_block, scalar_t* gx,
                         cudaStream_t stream);
template <typename scalar_t>
bool launch_grad_values_mma(const scalar_t* gy, const float* h, int64_t T, const BMask& b,
                            int splits, int64_t tokens_per_split, double scale, float* gb_partial,
                            scalar_t* grad_values, cudaStream_t stream);

// ---- batched multi-adapter ops (batched_delta_fwd.cu / batched_delta_bwd.cu) -------------------
// A pool of N adapters sharing (rank, in, out): per-adapter metadata is read on the device, so
// nothing about the batch needs to reach the host. Untrusted: the kernels read adapter a's
// rows only for 0 <= a < N, clamp value_starts[a] into [0, num_values] and the adapter's
// nnz (offsets[a, C]) into [0, num_values - value_start], and treat a distribution other than
// 2 as Rademacher: corrupt metadata gives wrong numbers, never an out-of-bounds access.
struct BatchedPool {
  const uint32_t* masks;        // (N, out, words)
  const int32_t* offsets;       // (N, chunks + 1), relative to the adapter's value start
  const int64_t* value_starts;  // (N,)
  const int64_t* seeds;         // (N,)
  const float* scales;          // (N,)
  const int32_t* dists;         // (N,)
  int64_t adapters, out, chunks, num_values;
  int words, rank;
  float mag_rademacher, mag_uniform;  // a_magnitude(dist, in_features)
};

// Tokens grouped by adapter (vLLM lora_shrink / punica SGMV style). keys[t] = adapter_ids[t]
// when it is in [0, N), else N (the "no adapter" group: -1 and, unvalidated, out-of-range
// ids); perm = a stable argsort of keys, so a group's tokens are perm[start, start + len).
// Each group is cut into tiles of at most `tile` tokens; tile i is the int64 row
// tiles[5 i .. 5 i + 4] = (group, start, len, seg_tiles, slot) with seg_tiles = the number of
// tiles of its group on the group's first tile and 0 on the others, and slot = the tile's index
// among the tiles of multi-tile groups (consecutive within a group), -1 for the tile of a
// single-tile group; tiles[5 max_tiles] = the number of tiles. A grid over tiles uses
// blockIdx.x = tile; blocks past the count exit. max_tiles = ceil(T / tile) + min(T, N + 1)
// bounds the tile count, so every token is in a tile; plan_max_slots bounds the slot count.
constexpr int kTileFields = 5;
struct TilePlan {
  const int64_t* perm;   // (T,) sorted position -> token
  const int64_t* tiles;  // (kTileFields max_tiles + 1,)
  int64_t max_tiles;
  int tile;
  int64_t max_slots;  // rows of the per-slot buffer a kernel indexes by slot (0: none)
};

inline int64_t plan_max_tiles(int64_t T, int64_t adapters, int tile) {
  const int64_t groups = adapters + 1 < T ? adapters + 1 : T;
  return (T + tile - 1) / tile + groups;
}

// Slots (tiles of groups longer than one tile): a group of L > tile tokens has
// ceil(L / tile) <= L / tile + 1 tiles and there are at most T / (tile + 1) such groups, so
// the count is at most ceil(T / tile) + floor(T / (tile + 1)), whatever the number of adapters.
inline int64_t plan_max_slots(int64_t T, int tile) {
  return (T + tile - 1) / tile + T / (tile + 1);
}

// keys (T,) from ids (int32 when !ids64, else int64). When bad != nullptr (validation), also
// atomicMin's bad[0] with the first token whose id lies outside [-1, N) and bad[1] with the
// first adapter used by some token whose metadata fails check_batched_adapter's rules
// (bad[0], bad[1] start at ULLONG_MAX).
void launch_batched_keys(const void* ids, bool ids64, int64_t T, const BatchedPool& p,
                         int64_t* keys, unsigned long long* bad, cudaStream_t stream);

// Builds the tile list from the sorted keys (one block). When count_out != nullptr the tile
// count and the slot count are also written to count_out[0] and count_out[1] (the host reads
// them with the validation flags in one copy).
void launch_batched_plan(const int64_t* sorted_keys, int64_t T, int64_t adapters, int tile,
                         int64_t max_tiles, int64_t* tiles, int64_t* count_out,
                         cudaStream_t stream);

// The same tile list from a plan's G groups (group i = sorted positions [starts[i],
// starts[i + 1]) of adapter groups[i]; batched_checks.h: BatchedPlan) instead of sorted keys.
// Bounds are clamped into [0, T] and an adapter outside [0, N) becomes the "no adapter" group
// N, so a malformed plan cannot make a kernel leave its buffers. max_tiles >= ceil(T / tile) + G.
void launch_batched_plan_groups(const int32_t* starts, const int32_t* groups, int64_t G,
                                int64_t T, int64_t adapters, int tile, int64_t max_tiles,
                                int64_t* tiles, cudaStream_t stream);

// partial[s, q, r] = sum_{j in slice s} x[perm[q], j] * A_a[r, j] for every sorted position q
// of a token with an adapter a (other rows are not written). grid_tiles <= max_tiles blocks.
template <typename scalar_t>
void launch_batched_shrink_a(const scalar_t* x, int64_t T, int64_t in, const BatchedPool& p,
                             const TilePlan& plan, int64_t grid_tiles, int splits,
                             int64_t slice_cols, acc_type_t<scalar_t>* partial,
                             cudaStream_t stream);

// y[perm[q], o] (+)= scales[a] * sum_k B_a[o, k] * h[q, k], h[q, k] = sum_s partial[s, q, k];
// rows of "no adapter" tokens are set to 0 unless accumulate (y already holds base).
template <typename scalar_t>
void launch_batched_expand_b(const acc_type_t<scalar_t>* partial, int splits, int64_t T,
                             const BatchedPool& p, const scalar_t* values, const TilePlan& plan,
                             int64_t grid_tiles, int64_t chunks_per_block, bool accumulate,
                             scalar_t* y, cudaStream_t stream);

// partial[s, q, k] = sum_{o in chunks of split s} gy[perm[q], o] * B_a[o, k].
template <typename scalar_t>
void launch_batched_shrink_b(const scalar_t* gy, int64_t T, const BatchedPool& p,
                             const scalar_t* values, const TilePlan& plan, int64_t grid_tiles,
                             int splits, int64_t chunks_per_split, acc_type_t<scalar_t>* partial,
                             cudaStream_t stream);

// gx[perm[q], j] = scales[a] * sum_k gh[q, k] * A_a[k, j], gh = sum_s partial[s]; rows of
// "no adapter" tokens are set to 0.
template <typename scalar_t>
void launch_batched_expand_a(const acc_type_t<scalar_t>* partial, int splits, int64_t T,
                             int64_t in, const BatchedPool& p, const TilePlan& plan,
                             int64_t grid_tiles, scalar_t* gx, cudaStream_t stream);

// G_i[o, k] = sum_{q in tile i} gy[perm[q], o] * h[q, k] (h (T, R) summed, sorted order).
// A single-tile group adds scales[a] * G_i[o, k] to gacc[value_start + p] for each pattern
// entry p = (o, k) straight from the tile's block; a tile of a multi-tile group stores G_i in
// gbp[slot], and the group's first tile then adds scales[a] * sum over the group's slots (fixed
// order). Either way one atomicAdd per (entry, group): an entry of one adapter gets a single
// add onto 0 (exact, deterministic); adapters sharing a value range sum their gradients.
// gbp: (plan.max_slots, out, rank), so its size depends on the tiles of multi-tile groups
// (plan_max_slots), not on the number of groups.
template <typename scalar_t>
void launch_batched_grad_values(const scalar_t* gy, const acc_type_t<scalar_t>* h, int64_t T,
                                const BatchedPool& p, const TilePlan& plan, int64_t grid_tiles,
                                acc_type_t<scalar_t>* gbp, acc_type_t<scalar_t>* gacc,
                                cudaStream_t stream);

// ---- merge (merge_delta.cu) ---------------------------------------------------------------------
// w[o, j] += scale * sum_k B[o, k] * A[k, j], w row-major with row stride ldw.
template <typename scalar_t>
void launch_merge(scalar_t* w, int64_t ldw, int64_t in, const BMask& b, const scalar_t* values,
                  const AGen& g, double scale, cudaStream_t stream);

// ---- random_a / philox (random_a.cu) ------------------------------------------------------------
// out[r, c] (row stride ld) = A[r, col_start + c] (fp32 element rounded once to scalar_t).
template <typename scalar_t>
void launch_random_a(scalar_t* out, int64_t rank, int64_t ncols, int64_t ld, int64_t col_start,
                     const AGen& g, cudaStream_t stream);

void launch_philox(const uint32_t* counters, uint32_t* out, int64_t n, uint32_t k0, uint32_t k1,
                   cudaStream_t stream);

}  // namespace lori::cuda

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
struct AGen {
  uint32_t k0, k1;
  int dist;
  float mag;
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

// Tensor-core forward (bf16/fp16, rank <= 64): same contract as launch_shrink_a with A's
// magnitude folded in (partial holds h itself). Returns false when it does not apply.
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

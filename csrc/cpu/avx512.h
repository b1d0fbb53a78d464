// AVX-512 variants of the decode-critical CPU kernels, one file per pass next to its AVX2
// version (agen_avx512.cpp, delta_common_avx512.cpp, b_stage_avx512.cpp,
// sparse_delta_bwd_avx512.cpp). isa.h's table decides at runtime when they run (the CPU has
// AVX-512 F/DQ/BW/VL; AVX2 stays the baseline). They compute the same results as the AVX2
// kernels: A bit-identical, the rest within the tolerance rule.
#pragma once
#include <cstdint>

#include "../checks.h"
#include "delta_common.h"

namespace lori::cpu {

// Philox words for pairs p in [0, n): row r0 + p / nb, block b0 + p % nb; words[4p + w].
void tile_words_avx512(const AGenParams& g, int64_t r0, int64_t b0, int64_t nb, int64_t n,
                       uint32_t* words);

// out[t] = magnitude * sum_j (+-x[t, j]) with the signs of A's row (bit j set -> negative).
void dot_rows_signs_avx512(const float* x, int64_t T, int64_t n, int64_t ldx,
                           const uint32_t* signs, float magnitude, float* out);

// Prefill B stage, the accumulate step of apply_b_avx2 (b_stage.h) 16 tokens wide: for rows
// i < nrows of a chunk, yT[i * ldy + t] = sum over the row's entries e in [st[i], st[i+1]) of
// v[e] * hT[ks[e] * Tp + tg + t], for t < ng (a multiple of 16, at most 64).
void accumulate_rows_avx512(const float* v, const int32_t* ks, const int32_t* st, int64_t nrows,
                            const float* hT, int64_t Tp, int64_t tg, int64_t ng, float* yT,
                            int64_t ldy);

// Prefill B stage, the store step of apply_b_avx2 for a chunk: y[token, row0 + i] (+)= scale *
// yT[i * ldy + t] for rows i < nrows and tokens t < min(ng, ntok) (ng a multiple of 16), token t
// at row tok[tg + t] of y (tok == nullptr: tg + t); 16x16 transposes, 16-wide stores.
template <typename scalar_t>
void store_chunk_avx512(const float* yT, int64_t ldy, int64_t nrows, int64_t ng, int64_t ntok,
                        const int64_t* tok, int64_t tg, scalar_t* y, int64_t out, int64_t row0,
                        float scale, bool accumulate);

// Decode backward pass over B (T <= 4 tokens, rank <= 32: one mask word per row), chunks
// [c0, c1): gh[t * 32 + k] += sum_o gy[t, o] B[o, k] (unscaled; gh null: skipped) and
// gv[p] = scale * sum_t gy[t, o] h[t * 32 + k] for each pattern entry p = (o, k) (gv null:
// skipped). gy is (T, out) row-major; h rows are zero past rank. Each chunk is validated
// before its values are read; returns the first bad chunk, or -1.
template <typename scalar_t>
int64_t gy_pass_decode_avx512(int64_t T, const BView& b, int64_t rank, int64_t nnz,
                              const scalar_t* gy, const float* h, float* gh, float* gv,
                              float scale, int64_t c0, int64_t c1);

// grad_x for Rademacher A and T <= 16 tokens, columns [c0, c1) (c0 a multiple of 128):
// gx[t * ldgx + c] = sum_r gh[t * rank + r] A[r, c], from A's sign bits (no fp32 A tile).
template <typename scalar_t>
void grad_x_signs_avx512(const float* gh, int64_t T, int64_t rank, const AGenParams& g,
                         int64_t c0, int64_t c1, scalar_t* gx, int64_t ldgx);

// Decode B stage (T <= 4): same contract as apply_b_expand_avx2 (b_stage.h).
template <typename scalar_t>
int64_t apply_b_expand_avx512(int64_t T, const BView& b, int64_t rank, int64_t nnz,
                              const float* h, int64_t ldh, float scale, scalar_t* y, int64_t c0,
                              int64_t c1, const int64_t* tok, bool accumulate);

}  // namespace lori::cpu

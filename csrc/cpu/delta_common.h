// Pieces shared by the CPU forward and backward of sparse_delta.
#pragma once
#include <ATen/core/Tensor.h>

#include <algorithm>

#include "../checks.h"
#include "isa.h"

namespace lori::cpu {

// Up to this many tokens, A is generated row by row into L1 and dotted with x by hand;
// above it, A is generated in column tiles of gemm_tile(rank) and multiplied with MKL.
constexpr int64_t kDirectMaxTokens = 16;
// Columns per A tile in the GEMM paths: ~512 KB of fp32 A (L2-resident), between 1024 and
// 4096 columns; always a multiple of 128, so tiles start on Philox block edges. Fewer, larger
// tiles mean fewer fork/joins and GEMM calls (rank 32: one 4096-column tile).
inline int64_t gemm_tile(int64_t rank) {
  const int64_t cols = (int64_t{128} * 1024) / (rank > 0 ? rank : 1);
  return std::clamp<int64_t>(cols & ~int64_t{127}, 1024, 4096);
}

inline int64_t round_up8(int64_t n) { return (n + 7) & ~int64_t{7}; }

// Reads the whole mask once: no bits at positions >= rank, chunk popcounts equal
// offsets[c+1] - offsets[c], offsets[0] == 0, offsets[-1] == nnz. After this, kernels may
// walk values by popcount without bounds checks.
void check_bitmask_cpu(const char* op, const at::Tensor& mask, const at::Tensor& offsets,
                       int64_t rank, int64_t nnz);

// O(1) ends of offsets (offsets[0] == 0, offsets[chunks] == nnz); the fast kernels check each
// chunk against the mask before reading its values.
void check_offset_ends(const char* op, const int32_t* offsets, int64_t chunks, int64_t nnz);

// hT (rank, round_up8(T)) fp32 = A @ x^T, zero in the padding columns. x2 is (T, in).
at::Tensor compute_hT(const at::Tensor& x2, const DeltaShape& s);

// compute_hT's direct path (T <= kDirectMaxTokens) on raw rows: h[r * ldh + t] = A[r] . x[t]
// for x rows t < T of leading dimension ldx (fp32). Leaves h's other columns alone.
void compute_hT_direct(const float* x, int64_t T, int64_t ldx, const DeltaShape& s, float* h,
                       int64_t ldh);

// The same in two steps, for callers that split A's rows over threads of their own:
// construct once (sums x's rows), then rows(r0, r1, ...) from any thread.
class DirectA {
 public:
  DirectA(const float* x, int64_t T, int64_t ldx, const DeltaShape& s);
  void rows(int64_t r0, int64_t r1, float* h, int64_t ldh) const;

 private:
  const float* x_;
  int64_t T_, ldx_;
  const DeltaShape& s_;
  Isa isa_;
  bool signs_;
  int64_t nb_;
};

// Values as fp32 (a copy only when they are not fp32 already).
at::Tensor values_f32(const at::Tensor& values);

}  // namespace lori::cpu

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "agen.h"
#include "lori/bitmask.h"

namespace lori::cpu {

// B in the bitmask form, as raw pointers (values already fp32).
struct BView {
  const uint32_t* mask;
  const float* values;
  const int32_t* offsets;
  int64_t out, words;
};

// One chunk (<= 64 rows) of B as a flat entry list, extracted without data-dependent
// branches: entry e (values index offsets[c] + e) sits at row[e] (within the chunk), column
// k[e]. Buffers need 64 * words * 32 + 8 slots. Returns the entry count, or -1 when the
// chunk contradicts offsets (or has bits >= rank): then nothing may be read from values.
int64_t extract_chunk(const BView& b, int64_t c, int64_t rank, int64_t nnz, int32_t* k,
                      int32_t* row);

// Calls f(scalar_t{}) for the three I/O dtypes of the fast kernels.
template <typename F>
void dispatch_io_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "lori: no fast CPU kernel for dtype ", t);
  }
}

// Dense B (out, rank) in dtype from the (already validated) bitmask form.
at::Tensor dense_b(const at::Tensor& mask, const at::Tensor& values, int64_t rank,
                   at::ScalarType dtype);

// Calls f(k0, A[:, k0:k0+kt]) for column tiles of A, in dtype.
template <typename F>
void for_a_tiles(const DeltaShape& s, at::ScalarType dtype, F&& f) {
  const int64_t tile = gemm_tile(s.rank);
  for (int64_t k0 = 0; k0 < s.in_features; k0 += tile) {
    const int64_t kt = std::min(tile, s.in_features - k0);
    at::Tensor a = at::empty({s.rank, kt}, at::TensorOptions().dtype(at::kFloat));
    float* ap = a.data_ptr<float>();
    at::parallel_for(0, s.rank, 1, [&](int64_t r0, int64_t r1) {
      gen_a_tile(s.gen, r0, r1, k0, k0 + kt, ap + r0 * kt, kt);
    });
    f(k0, kt, a.to(dtype));
  }
}


// float64 inputs (gradcheck) and CPUs without AVX2 take the generic path: the same tiling
// of A, with ATen GEMMs and a dense (out x rank) B, computing in float64 for float64 inputs.
bool use_generic_path(const at::Tensor& x);
// h_out (optional): receives h = x @ A^T, (T, rank) in the accumulation dtype. The result is
// in x's dtype, or in the accumulation dtype when acc_out (for callers that add it to
// something else first and round once).
at::Tensor sparse_delta_generic(const at::Tensor& x2, const at::Tensor& mask,
                                const at::Tensor& values, const DeltaShape& s, double scale,
                                at::Tensor* h_out = nullptr, bool acc_out = false);
// h = x2 @ A^T (T, rank) in the accumulation dtype (the generic x -> h stage).
at::Tensor shrink_generic(const at::Tensor& x2, const DeltaShape& s);
// grad_x = gh @ A (T, width) in dtype, gh (T, rank) in the accumulation dtype.
at::Tensor shrink_backward_generic(const at::Tensor& gh, const DeltaShape& s,
                                   at::ScalarType dtype);
std::tuple<at::Tensor, at::Tensor> sparse_delta_backward_generic(
    const at::Tensor& gy2, const at::Tensor& x2, const at::Tensor& mask, const at::Tensor& values,
    const DeltaShape& s, double scale, bool need_x, bool need_values,
    const at::Tensor& h_saved = at::Tensor());

}  // namespace lori::cpu

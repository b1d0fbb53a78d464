// CUDA merge_delta_: weight (OUT, IN) += scale * B @ A, in place.
//
// Grid (64-column tiles of A, 64-row chunks of B). Per mask word g the block generates
// A[32 g .. 32 g + 32, tile] into shared memory and decodes the chunk's 64 rows x 32 ranks of
// B into a dense shared tile; thread (j = tid % 64, rows 16 (tid / 64) .. + 16) accumulates the
// 16 outputs of its column in registers (acc_t), then weight is read, added to and rounded
// once. A is never written to global memory; B is read in its bitmask form.
#include "common.cuh"

namespace lori::cuda {
namespace {

constexpr int kALd = kAColTile + 8;
constexpr int kBLd = kRGroup + 1;
constexpr int kRowsPerThread = kRowChunk / (kThreads / kAColTile);  // 16

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(scalar_t* __restrict__ w, int64_t ldw, int64_t in, BMask b,
                 const scalar_t* __restrict__ values, AGen g, acc_type_t<scalar_t> scale) {
  using acc_t = acc_type_t<scalar_t>;
  __shared__ acc_t as[kRGroup * kALd];
  __shared__ acc_t bd[kRowChunk * kBLd];
  __shared__ uint32_t words_s[kRGroup * 4];
  __shared__ int rs[kRowChunk + 1];
  const int tid = threadIdx.x, j = tid % kAColTile, rg = tid / kAColTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kAColTile, c = blockIdx.y;
  chunk_row_starts(b, c, rs);
  const ChunkRange cr = chunk_range(b, c);
  acc_t acc[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) acc[i] = acc_t(0);
  for (int gw = 0; gw < b.words; ++gw) {
    gen_a_tile(g, kRGroup * gw, b.rank, c0, as, kALd, words_s);  // syncs before and after
    decode_b_chunk(b, values, c, rs, cr, gw, bd, kBLd);
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kRGroup; ++kk) {
      const acc_t a = as[kk * kALd + j];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        acc[i] += bd[(rg * kRowsPerThread + i) * kBLd + kk] * a;
      }
    }
  }
  const int64_t col = c0 + j;
  if (col >= in) return;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t o = c * kRowChunk + rg * kRowsPerThread + i;
    if (o < b.out) {
      scalar_t* p = w + o * ldw + col;
      *p = from_acc<scalar_t>(load_acc<acc_t>(p) + acc[i] * acc_t(scale));
    }
  }
}

}  // namespace

template <typename scalar_t>
void launch_merge(scalar_t* w, int64_t ldw, int64_t in, const BMask& b, const scalar_t* values,
                  const AGen& g, double scale, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(in, kAColTile)),
                  static_cast<unsigned>(num_chunks(b.out)));
  merge_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(w, ldw, in, b, values, g, scale);
  LORI_LAUNCH_CHECK();
}

template void launch_merge<float>(float*, int64_t, int64_t, const BMask&, const float*,
                                  const AGen&, double, cudaStream_t);
template void launch_merge<double>(double*, int64_t, int64_t, const BMask&, const double*,
                                   const AGen&, double, cudaStream_t);
template void launch_merge<c10::Half>(c10::Half*, int64_t, int64_t, const BMask&,
                                      const c10::Half*, const AGen&, double, cudaStream_t);
template void launch_merge<c10::BFloat16>(c10::BFloat16*, int64_t, int64_t, const BMask&,
                                          const c10::BFloat16*, const AGen&, double,
                                          cudaStream_t);

}  // namespace lori::cuda

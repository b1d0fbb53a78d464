// CUDA _random_a_fill and philox4x32_10: one thread per element / counter, straight from the
// spec's a_element and philox4x32_10 (lori/philox.h), so every backend shares the same lines.
// (The fused kernels generate whole tiles per Philox call instead; see common.cuh.)
#include "common.cuh"

namespace lori::cuda {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    random_a_kernel(scalar_t* __restrict__ out, int64_t rank, int64_t ncols, int64_t ld,
                    int64_t col_start, AGen g) {
  const int64_t n = rank * ncols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / ncols, cc = e % ncols;
    const float v = a_element(g.k0, g.k1, g.dist, g.mag, static_cast<uint32_t>(r),
                              static_cast<uint32_t>(col_start + cc));
    out[r * ld + cc] = from_acc<scalar_t>(v);
  }
}

__global__ void __launch_bounds__(kThreads)
    philox_kernel(const uint32_t* __restrict__ counters, uint32_t* __restrict__ out, int64_t n,
                  uint32_t k0, uint32_t k1) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const U32x4 c = {{counters[4 * i], counters[4 * i + 1], counters[4 * i + 2],
                      counters[4 * i + 3]}};
    const U32x4 r = philox4x32_10(c, k0, k1);
#pragma unroll
    for (int w = 0; w < 4; ++w) out[4 * i + w] = r.v[w];
  }
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = ceil_div(n, kThreads);
  return static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
}

}  // namespace

template <typename scalar_t>
void launch_random_a(scalar_t* out, int64_t rank, int64_t ncols, int64_t ld, int64_t col_start,
                     const AGen& g, cudaStream_t stream) {
  if (rank * ncols == 0) return;
  random_a_kernel<scalar_t>
      <<<grid_for(rank * ncols), kThreads, 0, stream>>>(out, rank, ncols, ld, col_start, g);
  LORI_LAUNCH_CHECK();
}

void launch_philox(const uint32_t* counters, uint32_t* out, int64_t n, uint32_t k0, uint32_t k1,
                   cudaStream_t stream) {
  if (n == 0) return;
  philox_kernel<<<grid_for(n), kThreads, 0, stream>>>(counters, out, n, k0, k1);
  LORI_LAUNCH_CHECK();
}

template void launch_random_a<float>(float*, int64_t, int64_t, int64_t, int64_t, const AGen&,
                                     cudaStream_t);
template void launch_random_a<double>(double*, int64_t, int64_t, int64_t, int64_t, const AGen&,
                                      cudaStream_t);
template void launch_random_a<c10::Half>(c10::Half*, int64_t, int64_t, int64_t, int64_t,
                                         const AGen&, cudaStream_t);
template void launch_random_a<c10::BFloat16>(c10::BFloat16*, int64_t, int64_t, int64_t, int64_t,
                                             const AGen&, cudaStream_t);

}  // namespace lori::cuda

// Host-side helpers shared by the CUDA op files (ops_cuda.cpp, ops_cuda_batched.cpp): device
// attributes and launch planning (the dtype switch is in static_switch.h). Plain C++
// (compiled by the host compiler).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cstdint>

#include "kernels.cuh"
#include "static_switch.h"

namespace lori::cuda {

inline constexpr int64_t kMaxGridY = 65535;
inline constexpr int64_t kAColTileHost = 64;  // columns per A tile (common.cuh's kAColTile)

// Device attributes, read once per device.
inline int device_attr(c10::DeviceIndex dev, cudaDeviceAttr attr, int slot) {
  static std::array<std::array<std::atomic<int>, 64>, 2> cache{};
  const int i = std::clamp<int>(dev, 0, 63);
  int n = cache[slot][i].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, attr, dev));
    cache[slot][i].store(n, std::memory_order_relaxed);
  }
  return n;
}
inline int sm_count(c10::DeviceIndex dev) {
  return device_attr(dev, cudaDevAttrMultiProcessorCount, 0);
}
// The wmma kernel needs sm_80+ (and a build whose TORCH_CUDA_ARCH_LIST includes such an arch;
// the default 9.0+PTX does).
inline bool has_bf16_mma(c10::DeviceIndex dev) {
  return device_attr(dev, cudaDevAttrComputeCapabilityMajor, 1) >= 8;
}

inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_grid_y(const char* op, int64_t n, const char* what) {
  TORCH_CHECK_VALUE(n <= kMaxGridY, op, ": too many ", what, " for one CUDA launch (", n,
                    " > ", kMaxGridY, ")");
}

// Splits of a reduction of `len` into slices of a multiple of `quantum`, enough that
// tiles * splits is about 4 blocks per SM (memory-bound kernels need the loads in flight).
// Decode caps the splits at decode_split_cap(T): the consumer kernel of the (S, T, R) partials
// sums S * T values per rank in every block.
inline int64_t decode_split_cap(int64_t T) {
  return std::max<int64_t>(1, 512 / std::max<int64_t>(T, 1));
}
struct Split {
  int splits;
  int64_t per_split;  // a multiple of quantum
};
inline Split plan_split(int64_t len, int64_t quantum, int64_t tiles, int sms,
                        int64_t max_splits = INT32_MAX) {
  const int64_t units = std::max<int64_t>(1, (len + quantum - 1) / quantum);
  const int64_t want =
      std::clamp<int64_t>((4 * sms + tiles - 1) / tiles, 1, std::min(units, max_splits));
  const int64_t per = (units + want - 1) / want;
  return Split{static_cast<int>((units + per - 1) / per), per * quantum};
}

inline int token_tile(int64_t T, at::ScalarType t, int64_t rank) {
  return T > kSmallTile && t != at::kDouble && rank <= kLargeTileMaxRank ? kLargeTile : kSmallTile;
}

}  // namespace lori::cuda

// The compile-time switches of the CUDA backend, in one place: a runtime value (dtype, token
// tile, padded rank) picks one template instantiation. Plain C++, so the host op files and the
// .cu launchers share it. Usage (the body is a lambda; NAME is a constexpr inside it):
//   LORI_TILE_SWITCH(tile, !std::is_same_v<scalar_t, double>, TILE, [&] {
//     kernel<scalar_t, TILE><<<grid, block, 0, stream>>>(...);
//   });
#pragma once
#include <ATen/core/ATen_fwd.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "kernels.cuh"

// NAME = true / false as COND holds.
#define LORI_BOOL_SWITCH(COND, NAME, ...)  \
  [&] {                                    \
    if (COND) {                            \
      constexpr static bool NAME = true;   \
      return __VA_ARGS__();                \
    } else {                               \
      constexpr static bool NAME = false;  \
      return __VA_ARGS__();                \
    }                                      \
  }()

// NAME = kLargeTile when TILE_VALUE is kLargeTile and ALLOW_LARGE (a constant expression: the
// large tile is not instantiated where it cannot fit, e.g. double in static shared memory),
// else kSmallTile. With ALLOW_LARGE, a value that is neither tile is an internal error.
#define LORI_TILE_SWITCH(TILE_VALUE, ALLOW_LARGE, NAME, ...)                                 \
  [&] {                                                                                      \
    if constexpr (ALLOW_LARGE) {                                                             \
      if ((TILE_VALUE) == ::lori::cuda::kLargeTile) {                                        \
        constexpr static int NAME = ::lori::cuda::kLargeTile;                                \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      TORCH_INTERNAL_ASSERT((TILE_VALUE) == ::lori::cuda::kSmallTile, "token tile ",         \
                            (TILE_VALUE));                                                   \
    }                                                                                        \
    constexpr static int NAME = ::lori::cuda::kSmallTile;                                    \
    return __VA_ARGS__();                                                                    \
  }()

// NAME = the rank padded for the tensor-core kernels: 32 for rank <= 32, else 64 (callers
// have checked rank <= 64).
#define LORI_RANK_PAD_SWITCH(RANK, NAME, ...) \
  [&] {                                       \
    if ((RANK) <= 32) {                       \
      constexpr static int NAME = 32;         \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr static int NAME = 64;         \
      return __VA_ARGS__();                   \
    }                                         \
  }()

namespace lori::cuda {

// Calls f(scalar_t{}) for the four dtypes of the CUDA kernels.
template <typename F>
void dispatch(const char* op, at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK_TYPE(false, op, ": no CUDA kernel for dtype ", t);
  }
}

}  // namespace lori::cuda

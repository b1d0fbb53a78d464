// The B spec (docs/spec_b.md): bitmask + packed values + chunk offsets, for host and device.
#pragma once
#include <cstdint>
#include "lori/philox.h"  // LORI_HD

namespace lori {

constexpr int kBSpecVersion = 1;
constexpr int kMaxRank = 256;      // mask words per row <= 8
constexpr int kRowChunk = 64;      // rows per offsets entry
constexpr int kRowChunkLog2 = 6;

LORI_HD int mask_words(int rank) { return (rank + 31) >> 5; }
LORI_HD int64_t num_chunks(int64_t out_features) { return (out_features + kRowChunk - 1) >> kRowChunkLog2; }

LORI_HD int popcount32(uint32_t w) {
#if defined(__CUDA_ARCH__)
  return __popc(w);
#else
  return __builtin_popcount(w);
#endif
}

LORI_HD int ctz32(uint32_t w) {
#if defined(__CUDA_ARCH__)
  return __ffs(static_cast<int>(w)) - 1;
#else
  return __builtin_ctz(w);
#endif
}

// Bits of the last mask word that may be set for this rank (all ones when rank % 32 == 0).
LORI_HD uint32_t last_word_valid_bits(int rank) {
  const int rem = rank & 31;
  return rem == 0 ? 0xffffffffu : ((1u << rem) - 1u);
}

}  // namespace lori

// Generating tiles of A on the CPU (docs/spec_a.md), vectorized Philox.
#pragma once
#include <cstdint>

#include "../checks.h"

namespace lori::cpu {

// out[(r - r0) * ld + (c - c0)] = A[r, c] in fp32 for r in [r0, r1), c in [c0, c1).
// Bit-identical to lori::a_element for every element. Single-threaded: callers split work.
void gen_a_tile(const AGenParams& g, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* out,
                int64_t ld);

}  // namespace lori::cpu

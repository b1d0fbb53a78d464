// Generating tiles of A on the CPU (docs/spec_a.md), vectorized Philox.
#pragma once
#include <cstdint>

#include "../checks.h"

namespace lori::cpu {

// out[(r - r0) * ld + (c - c0)] = A[r, c] in fp32 for r in [r0, r1), c in [c0, c1).
// Bit-identical to lori::a_element for every element. Single-threaded: callers split work.
void gen_a_tile(const AGenParams& g, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* out,
                int64_t ld);

// Raw Philox words: words[((r - r0) * nb + (b - b0)) * 4 + w] = word w of block b of row r,
// for rows [r0, r1) and blocks [b0, b0 + nb). A row's words, read as one stream, hold its
// elements in column order (docs/spec_a.md): uniform element e = word e; Rademacher element
// e = bit e % 32 of word e / 32.
void gen_a_words(const AGenParams& g, int64_t r0, int64_t r1, int64_t b0, int64_t nb,
                 uint32_t* words);

}  // namespace lori::cpu

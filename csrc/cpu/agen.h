// Generating tiles of A on the CPU (docs/spec_a.md), vectorized Philox.
#pragma once
#include <cstdint>

#include "../checks.h"

namespace lori::cpu {

// out[(r - r0) * ld + (c - c0)] = A[r, g.col0 + c] in fp32 for r in [r0, r1), c in [c0, c1):
// columns are the window's (g.col0 = 0: A's own). Bit-identical to lori::a_element for every
// element. Single-threaded: callers split work.
void gen_a_tile(const AGenParams& g, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* out,
                int64_t ld);

// Rademacher sign bits of row r for window columns [c0, c0 + n): bit j % 32 of words[j / 32]
// is set iff A[r, g.col0 + c0 + j] < 0, for any col0 + c0 (not only Philox block edges: a
// window that starts mid-block gets the block's stream shifted). Bits past n are unspecified.
// words needs ceil(n / 32) + 1 slots.
void gen_a_signs(const AGenParams& g, int64_t r, int64_t c0, int64_t n, uint32_t* words);

// Raw Philox words (absolute blocks: g.col0 is not applied): words[((r - r0) * nb + (b - b0)) * 4 + w] = word w of block b of row r,
// for rows [r0, r1) and blocks [b0, b0 + nb). A row's words, read as one stream, hold its
// elements in column order (docs/spec_a.md): uniform element e = word e; Rademacher element
// e = bit e % 32 of word e / 32.
void gen_a_words(const AGenParams& g, int64_t r0, int64_t r1, int64_t b0, int64_t nb,
                 uint32_t* words);

// Philox counters of the (row, block) pairs p = 0, 1, ... of a tile: row r0 + p / nb, block
// b0 + p % nb, stepped without dividing (a 64-bit divide per pair cost more than the
// vectorized rounds of its block).
class PairCursor {
 public:
  // Starting at pair p.
  PairCursor(int64_t r0, int64_t b0, int64_t nb, int64_t p = 0)
      : b0_(b0), b1_(b0 + nb), blk_(b0 + p % nb), row_(r0 + p / nb) {}
  // The next n pairs' counters.
  void next(int n, uint32_t* blk, uint32_t* row) {
    for (int i = 0; i < n; ++i) {
      blk[i] = static_cast<uint32_t>(blk_);
      row[i] = static_cast<uint32_t>(row_);
      if (++blk_ == b1_) {
        blk_ = b0_;
        ++row_;
      }
    }
  }

 private:
  int64_t b0_, b1_, blk_, row_;
};

// Blocks of the next n pairs of `cur`, one at a time (tails of the vectorized generators).
void tile_words_scalar(const AGenParams& g, PairCursor& cur, int64_t n, uint32_t* words);

}  // namespace lori::cpu

#include "delta_common.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "agen.h"
#include "lori/bitmask.h"
#include "avx512.h"
#include "simd.h"

namespace lori::cpu {

void check_bitmask_cpu(const char* op, const at::Tensor& mask, const at::Tensor& offsets,
                       int64_t rank, int64_t nnz) {
  const at::Tensor m = mask.contiguous(), off = offsets.contiguous();
  const auto* w = reinterpret_cast<const uint32_t*>(m.data_ptr<int32_t>());
  const int32_t* o = off.data_ptr<int32_t>();
  const int64_t out = m.size(0), words = m.size(1);
  const uint32_t last_valid = last_word_valid_bits(static_cast<int>(rank));
  TORCH_CHECK_VALUE(o[0] == 0, op, ": offsets[0] must be 0, got ", o[0]);
  for (int64_t c = 0; c < num_chunks(out); ++c) {
    int64_t count = 0;
    const int64_t r_end = std::min<int64_t>(out, (c + 1) * kRowChunk);
    for (int64_t r = c * kRowChunk; r < r_end; ++r) {
      for (int64_t k = 0; k < words; ++k) count += popcount32(w[r * words + k]);
      TORCH_CHECK_VALUE((w[r * words + words - 1] & ~last_valid) == 0, op, ": mask row ", r,
                        " has bits set at positions >= rank (", rank, ")");
    }
    TORCH_CHECK_VALUE(o[c + 1] - static_cast<int64_t>(o[c]) == count, op, ": offsets[", c + 1,
                      "] - offsets[", c, "] = ", o[c + 1] - static_cast<int64_t>(o[c]),
                      " but mask rows [", c * kRowChunk, ", ", r_end, ") hold ", count,
                      " entries");
  }
  TORCH_CHECK_VALUE(o[num_chunks(out)] == nnz, op, ": mask holds ", o[num_chunks(out)],
                    " entries but values has ", nnz);
}

// Dense B (out, rank) in dtype from the (already validated) bitmask form.
at::Tensor dense_b(const at::Tensor& mask, const at::Tensor& values, int64_t rank,
                   at::ScalarType dtype) {
  const at::Tensor m = mask.contiguous();
  const at::Tensor v = values.to(at::kDouble).contiguous();
  const int64_t out = m.size(0), words = m.size(1);
  at::Tensor b = at::zeros({out, rank}, at::TensorOptions().dtype(at::kDouble));
  const auto* mw = reinterpret_cast<const uint32_t*>(m.data_ptr<int32_t>());
  const double* vp = v.data_ptr<double>();
  double* bp = b.data_ptr<double>();
  int64_t p = 0;
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t w = 0; w < words; ++w) {
      for (uint32_t bits = mw[o * words + w]; bits; bits &= bits - 1) {
        bp[o * rank + 32 * w + ctz32(bits)] = vp[p++];
      }
    }
  }
  return b.to(dtype);
}

namespace {

// kBitPos[byte][i] = position of the i-th set bit of byte (0 past its popcount).
struct BitPosTable {
  alignas(32) int32_t pos[256][8];
  BitPosTable() {
    for (int b = 0; b < 256; ++b) {
      int n = 0;
      for (int i = 0; i < 8; ++i) pos[b][i] = 0;
      for (int i = 0; i < 8; ++i) {
        if (b & (1 << i)) pos[b][n++] = i;
      }
    }
  }
};
const BitPosTable kBitPos;

LORI_AVX2 int64_t extract_chunk_avx2(const BView& b, int64_t c, int64_t rank, int64_t nnz,
                                     int32_t* ks, int32_t* rows) {
  const int64_t row0 = c * kRowChunk, row1 = std::min(b.out, row0 + kRowChunk);
  const int64_t o0 = b.offsets[c], o1 = b.offsets[c + 1];
  if (o0 < 0 || o1 < o0 || o1 > nnz) return -1;
  const uint32_t last_valid = last_word_valid_bits(static_cast<int>(rank));
  int64_t n = 0;
  uint32_t stray = 0;
  for (int64_t r = row0; r < row1; ++r) {
    const __m256i rv = _mm256_set1_epi32(static_cast<int>(r - row0));
    const uint32_t* w = b.mask + r * b.words;
    stray |= w[b.words - 1] & ~last_valid;
    for (int64_t q = 0; q < b.words; ++q) {
      for (int byte = 0; byte < 4; ++byte) {
        const uint32_t bits = (w[q] >> (8 * byte)) & 0xffu;
        const __m256i pos = _mm256_add_epi32(
            _mm256_load_si256(reinterpret_cast<const __m256i*>(kBitPos.pos[bits])),
            _mm256_set1_epi32(static_cast<int>(32 * q + 8 * byte)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(ks + n), pos);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(rows + n), rv);
        n += __builtin_popcount(bits);
      }
    }
  }
  return (stray != 0 || n != o1 - o0) ? -1 : n;
}

}  // namespace

int64_t extract_chunk(const BView& b, int64_t c, int64_t rank, int64_t nnz, int32_t* k,
                      int32_t* row) {
  return extract_chunk_avx2(b, c, rank, nnz, k, row);
}

at::Tensor values_f32(const at::Tensor& values) {
  return values.scalar_type() == at::kFloat ? values.contiguous()
                                            : values.to(at::kFloat).contiguous();
}

namespace {

// Dot products of x rows with one row of A, h[t] = sum_j x[t, j] a[j], t < T. A is given
// either as fp32 values (uniform) or as Rademacher sign words + magnitude: the sign variant
// flips x's sign bits instead of multiplying, so A is never expanded to floats.
// Single tokens use 4 accumulators (a lone add chain is latency-bound); groups of 4 tokens
// use one each.
struct RowA {
  const float* values = nullptr;    // uniform: n fp32 values
  const uint32_t* signs = nullptr;  // rademacher: bit j = A[r, j] < 0
  float magnitude = 1.f;
};

LORI_AVX2 inline __m256 sign_mask8(uint32_t word, int sub) {
  // Lane l gets bit (8 sub + l) of word in its sign bit.
  const __m256i base = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
  const __m256i sh = _mm256_sub_epi32(base, _mm256_set1_epi32(8 * sub));
  return _mm256_castsi256_ps(_mm256_and_si256(
      _mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int>(word)), sh),
      _mm256_set1_epi32(static_cast<int>(0x80000000u))));
}

template <int NT>
LORI_AVX2 void dot_group_avx2(const float* x, int64_t n, int64_t ldx, const RowA& a, float* out) {
  // NT == 1: four accumulators for one token; NT == 4: one accumulator per token.
  __m256 acc[4];
  for (auto& v : acc) v = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    __m256 av[4];
    if (a.signs) {
      const uint32_t w = a.signs[j >> 5];
      for (int q = 0; q < 4; ++q) av[q] = sign_mask8(w, q);
    } else {
      for (int q = 0; q < 4; ++q) av[q] = _mm256_loadu_ps(a.values + j + 8 * q);
    }
    if constexpr (NT == 1) {
      for (int q = 0; q < 4; ++q) {
        const __m256 xv = _mm256_loadu_ps(x + j + 8 * q);
        acc[q] = a.signs ? _mm256_add_ps(acc[q], _mm256_xor_ps(xv, av[q]))
                         : _mm256_fmadd_ps(xv, av[q], acc[q]);
      }
    } else {
      for (int t = 0; t < NT; ++t) {
        for (int q = 0; q < 4; ++q) {
          const __m256 xv = _mm256_loadu_ps(x + t * ldx + j + 8 * q);
          acc[t] = a.signs ? _mm256_add_ps(acc[t], _mm256_xor_ps(xv, av[q]))
                           : _mm256_fmadd_ps(xv, av[q], acc[t]);
        }
      }
    }
  }
  float r[NT];
  if constexpr (NT == 1) {
    r[0] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  } else {
    for (int t = 0; t < NT; ++t) r[t] = hsum8(acc[t]);
  }
  for (; j < n; ++j) {  // tail columns
    const float aj = a.signs ? (((a.signs[j >> 5] >> (j & 31)) & 1u) ? -1.f : 1.f) : a.values[j];
    for (int t = 0; t < NT; ++t) r[t] += x[t * ldx + j] * aj;
  }
  const float m = a.signs ? a.magnitude : 1.f;
  for (int t = 0; t < NT; ++t) out[t] = r[t] * m;
}

LORI_AVX2 void dot_rows_avx2(const float* x, int64_t T, int64_t n, int64_t ldx, const RowA& a,
                             float* out) {
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) dot_group_avx2<4>(x + t * ldx, n, ldx, a, out + t);
  for (; t < T; ++t) dot_group_avx2<1>(x + t * ldx, n, ldx, a, out + t);
}

void dot_rows_scalar(const float* x, int64_t T, int64_t n, int64_t ldx, const RowA& a,
                     float* out) {
  for (int64_t t = 0; t < T; ++t) {
    float r = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      const float aj = a.signs ? (((a.signs[j >> 5] >> (j & 31)) & 1u) ? -a.magnitude : a.magnitude)
                               : a.values[j];
      r += x[t * ldx + j] * aj;
    }
    out[t] = r;
  }
}

}  // namespace

DirectA::DirectA(const float* x, int64_t T, int64_t ldx, const DeltaShape& s)
    : x_(x), T_(T), ldx_(ldx), s_(s), isa_(cpu_paths().x_dot),
      signs_(s.gen.dist == kRademacher),
      nb_(((s.in_features - 1) >> elems_per_block_log2(s.gen.dist)) + 1) {
  TORCH_INTERNAL_ASSERT(T <= kDirectMaxTokens, "DirectA: T = ", T);
}

void DirectA::rows(int64_t r0, int64_t r1, float* h, int64_t ldh) const {
  const int64_t in = s_.in_features;
  // Grow-only per thread: batched decode runs this once per adapter.
  thread_local std::vector<float> row;
  thread_local std::vector<uint32_t> words;
  if (signs_) {
    if (words.size() < static_cast<size_t>(4 * nb_ + 1)) {
      words.resize(static_cast<size_t>(4 * nb_ + 1));
    }
  } else if (row.size() < static_cast<size_t>(in)) {
    row.resize(static_cast<size_t>(in));
  }
  for (int64_t r = r0; r < r1; ++r) {
    RowA a;
    if (signs_) {
      gen_a_signs(s_.gen, r, 0, in, words.data());  // window columns [0, in)
      a.signs = words.data();
      a.magnitude = s_.gen.magnitude;
    } else {
      gen_a_tile(s_.gen, r, r + 1, 0, in, row.data(), in);
      a.values = row.data();
    }
    if (signs_ && isa_ == Isa::kAvx512) {
      dot_rows_signs_avx512(x_, T_, in, ldx_, a.signs, a.magnitude, h + r * ldh);
    } else if (isa_ >= Isa::kAvx2) {
      dot_rows_avx2(x_, T_, in, ldx_, a, h + r * ldh);
    } else {
      dot_rows_scalar(x_, T_, in, ldx_, a, h + r * ldh);
    }
  }
}

void compute_hT_direct(const float* xp, int64_t T, int64_t ldx, const DeltaShape& s, float* h,
                       int64_t ldh) {
  const DirectA a(xp, T, ldx, s);
  at::parallel_for(0, s.rank, 1, [&](int64_t r0, int64_t r1) { a.rows(r0, r1, h, ldh); });
}

void check_offset_ends(const char* op, const int32_t* offsets, int64_t chunks, int64_t nnz) {
  TORCH_CHECK_VALUE(offsets[0] == 0, op, ": offsets[0] must be 0, got ", offsets[0]);
  TORCH_CHECK_VALUE(offsets[chunks] == nnz, op, ": offsets[-1] = ", offsets[chunks],
                    " entries but values has ", nnz);
}

at::Tensor compute_hT(const at::Tensor& x2, const DeltaShape& s) {
  const int64_t T = x2.size(0), in = s.in_features, rank = s.rank, Tp = round_up8(T);
  at::Tensor hT = at::zeros({rank, Tp}, x2.options().dtype(at::kFloat));
  if (T == 0) return hT;
  if (T <= kDirectMaxTokens) {
    const at::Tensor xf = x2.to(at::kFloat).contiguous();
    compute_hT_direct(xf.data_ptr<float>(), T, in, s, hT.data_ptr<float>(), Tp);
    return hT;
  }
  // MKL runs x (T, kt) @ A_tile^T faster than A_tile @ x^T here: compute h (T, rank), then
  // transpose the small result into hT.
  at::Tensor hm = at::empty({T, rank}, hT.options());
  int64_t tile = gemm_tile(rank);
  if (x2.scalar_type() != at::kFloat) {
    // bf16/fp16 x is converted to fp32 a tile at a time: keep that copy near 8 MB (wider
    // tiles measured ~5% slower at T = 2048).
    const int64_t cap = ((int64_t{2} << 20) / T) & ~int64_t{127};
    tile = std::clamp<int64_t>(cap, 1024, tile);
  }
  for (int64_t k0 = 0; k0 < in; k0 += tile) {
    const int64_t kt = std::min(tile, in - k0);
    at::Tensor at_ = at::empty({rank, kt}, hT.options());
    float* ap = at_.data_ptr<float>();
    at::parallel_for(0, rank, 1, [&](int64_t r0, int64_t r1) {
      gen_a_tile(s.gen, r0, r1, k0, k0 + kt, ap + r0 * kt, kt);
    });
    at::Tensor xt = x2.narrow(1, k0, kt);
    if (xt.scalar_type() != at::kFloat) xt = xt.to(at::kFloat);
    if (k0 == 0) {
      at::mm_out(hm, xt, at_.t());
    } else {
      hm.addmm_(xt, at_.t());
    }
  }
  hT.narrow(1, 0, T).copy_(hm.t());
  return hT;
}

}  // namespace lori::cpu

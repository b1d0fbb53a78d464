// CPU backward of sparse_delta.
//   gh = scale * gy @ B          (T, rank)     -> grad_x = gh @ A
//   grad_values[(o, k)] = scale * sum_t gy[t, o] * h[t, k],  h = x @ A^T (recomputed)
// One pass over gy (in 8x8 blocks, transposed in registers) feeds both gh and grad_values;
// A is generated twice (for h, then for grad_x), which is cheap next to a GEMM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "agen.h"
#include "avx512.h"
#include "b_stage.h"
#include "delta_common.h"
#include "isa.h"
#include "simd.h"

namespace lori::cpu {
namespace {

// Over chunks [c0, c1): ghT_part (rank x Tp) += B^T gy^T (unscaled) when non-null, and
// gv[p] = scale * sum_t gy[t, o] hT[k, t] for every entry p = (o, k) when gv is non-null.
// Per chunk: the flat entry list once (extract_chunk); then per group of up to kTokGroup
// tokens, the chunk's gy columns are transposed into gT (64 rows x tokens) and each entry
// runs two streaming loops over the tokens: a dot (gv) and an axpy (gh). Returns the first
// chunk that failed validation, or -1.
constexpr int64_t kTokGroup = 256;

template <typename scalar_t>
LORI_AVX2 int64_t gy_pass_avx2(const BView& b, int64_t rank, int64_t nnz, const scalar_t* gy,
                               int64_t T, int64_t Tp, const float* hT, float* ghT_part,
                               float* gv, float scale, int64_t c0, int64_t c1) {
  const size_t cap = static_cast<size_t>(kRowChunk * b.words * 32 + 8);
  std::vector<int32_t> ks(cap), rows(cap);
  std::vector<float> gvsum(gv ? cap : 0);
  std::vector<float> gT(static_cast<size_t>(kRowChunk * kTokGroup));
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t n = extract_chunk(b, c, rank, nnz, ks.data(), rows.data());
    if (n < 0) return c;
    if (n == 0) continue;
    const int64_t row0 = c * kRowChunk, nrows = std::min(b.out, row0 + kRowChunk) - row0;
    const float* v = b.values + b.offsets[c];
    if (gv) std::fill(gvsum.begin(), gvsum.begin() + n, 0.f);
    for (int64_t tg = 0; tg < Tp; tg += kTokGroup) {
      const int64_t ng = std::min(kTokGroup, Tp - tg);  // multiple of 8
      // gT[i][t - tg] = gy[t, row0 + i], zero past T.
      for (int64_t tb = tg; tb < tg + ng; tb += 8) {
        const int nt = static_cast<int>(std::min<int64_t>(8, T - tb));
        for (int64_t i0 = 0; i0 < nrows; i0 += 8) {
          const int no = static_cast<int>(std::min<int64_t>(8, nrows - i0));
          __m256 blk[8];
          for (int l = 0; l < 8; ++l) {
            const scalar_t* src = gy + (tb + l) * b.out + row0 + i0;
            blk[l] = l >= nt ? _mm256_setzero_ps() : (no == 8 ? load8(src) : load_partial(src, no));
          }
          transpose8x8(blk);
          for (int i = 0; i < no; ++i) _mm256_storeu_ps(gT.data() + (i0 + i) * kTokGroup + (tb - tg), blk[i]);
        }
      }
      for (int64_t e = 0; e < n; ++e) {
        const float* gr = gT.data() + rows[e] * kTokGroup;
        const int64_t kofs = static_cast<int64_t>(ks[e]) * Tp + tg;
        if (gv) {
          const float* hk = hT + kofs;
          __m256 d0 = _mm256_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
          int64_t t = 0;
          for (; t + 32 <= ng; t += 32) {
            d0 = _mm256_fmadd_ps(_mm256_loadu_ps(gr + t), _mm256_loadu_ps(hk + t), d0);
            d1 = _mm256_fmadd_ps(_mm256_loadu_ps(gr + t + 8), _mm256_loadu_ps(hk + t + 8), d1);
            d2 = _mm256_fmadd_ps(_mm256_loadu_ps(gr + t + 16), _mm256_loadu_ps(hk + t + 16), d2);
            d3 = _mm256_fmadd_ps(_mm256_loadu_ps(gr + t + 24), _mm256_loadu_ps(hk + t + 24), d3);
          }
          for (; t < ng; t += 8) d0 = _mm256_fmadd_ps(_mm256_loadu_ps(gr + t), _mm256_loadu_ps(hk + t), d0);
          gvsum[e] += hsum8(_mm256_add_ps(_mm256_add_ps(d0, d1), _mm256_add_ps(d2, d3)));
        }
        if (ghT_part) {
          float* dst = ghT_part + kofs;
          const __m256 ve = _mm256_set1_ps(v[e]);
          for (int64_t t = 0; t < ng; t += 8) {
            _mm256_storeu_ps(dst + t, _mm256_fmadd_ps(ve, _mm256_loadu_ps(gr + t), _mm256_loadu_ps(dst + t)));
          }
        }
      }
    }
    if (gv) {
      float* out = gv + b.offsets[c];
      for (int64_t e = 0; e < n; ++e) out[e] = scale * gvsum[e];
    }
  }
  return -1;
}

// gx[t, c] (T x n, fp32 tile) = sum_k gh[t, k] * a[k, c]; gh is (T, rank) row-major.
LORI_AVX2 void axpy_cols_avx2(const float* gh, int64_t T, int64_t rank, const float* a,
                              int64_t n, float* out) {
  for (int64_t t = 0; t < T; ++t) {
    const float* g = gh + t * rank;
    float* o = out + t * n;
    int64_t c = 0;
    for (; c + 32 <= n; c += 32) {
      __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t k = 0; k < rank; ++k) {
        const __m256 bk = _mm256_set1_ps(g[k]);
        const float* ak = a + k * n + c;
        s0 = _mm256_fmadd_ps(bk, _mm256_loadu_ps(ak), s0);
        s1 = _mm256_fmadd_ps(bk, _mm256_loadu_ps(ak + 8), s1);
        s2 = _mm256_fmadd_ps(bk, _mm256_loadu_ps(ak + 16), s2);
        s3 = _mm256_fmadd_ps(bk, _mm256_loadu_ps(ak + 24), s3);
      }
      _mm256_storeu_ps(o + c, s0);
      _mm256_storeu_ps(o + c + 8, s1);
      _mm256_storeu_ps(o + c + 16, s2);
      _mm256_storeu_ps(o + c + 24, s3);
    }
    for (; c < n; ++c) {
      float s = 0.f;
      for (int64_t k = 0; k < rank; ++k) s += g[k] * a[k * n + c];
      o[c] = s;
    }
  }
}

template <typename scalar_t>
LORI_AVX2 void store_rows(const float* src, int64_t T, int64_t n, scalar_t* dst, int64_t ld) {
  for (int64_t t = 0; t < T; ++t) {
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) store8(dst + t * ld + c, _mm256_loadu_ps(src + t * n + c));
    for (; c < n; ++c) dst[t * ld + c] = static_cast<scalar_t>(src[t * n + c]);
  }
}

// grad_x (T, in) = gh @ A, gh given as ghT (rank, Tp) fp32, already scaled.
void grad_x_from_gh(const at::Tensor& ghT, const DeltaShape& s, int64_t T, const at::Tensor& gx2) {
  const at::Tensor gh = ghT.narrow(1, 0, T).t().contiguous();  // (T, rank)
  const int64_t in = s.in_features, rank = s.rank;
  // Up to 4 tokens, A tiles and an axpy per token; from 5 up MKL's GEMM on A tiles measured
  // as fast (T=5) or faster (T=8..16: 8-10%).
  if (T <= kExpandMaxTokens) {
    constexpr int64_t kTile = 256;
    const float* ghp = gh.data_ptr<float>();
    dispatch_io_type(gx2.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      scalar_t* gxp = gx2.data_ptr<scalar_t>();
      at::parallel_for(0, (in + kTile - 1) / kTile, 1, [&](int64_t j0, int64_t j1) {
        std::vector<float> a(static_cast<size_t>(rank * kTile)), tile(static_cast<size_t>(T * kTile));
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t c0 = j * kTile, n = std::min(kTile, in - c0);
          gen_a_tile(s.gen, 0, rank, c0, c0 + n, a.data(), n);
          axpy_cols_avx2(ghp, T, rank, a.data(), n, tile.data());
          store_rows(tile.data(), T, n, gxp + c0, in);
        }
      });
    });
    return;
  }
  const int64_t tile = gemm_tile(rank);
  for (int64_t k0 = 0; k0 < in; k0 += tile) {
    const int64_t kt = std::min(tile, in - k0);
    at::Tensor a = at::empty({rank, kt}, ghT.options());
    float* ap = a.data_ptr<float>();
    at::parallel_for(0, rank, 1, [&](int64_t r0, int64_t r1) {
      gen_a_tile(s.gen, r0, r1, k0, k0 + kt, ap + r0 * kt, kt);
    });
    at::Tensor dst = gx2.narrow(1, k0, kt);
    if (dst.scalar_type() == at::kFloat) {
      at::mm_out(dst, gh, a);  // BLAS writes the strided column tile in place
    } else {
      dst.copy_(at::mm(gh, a));
    }
  }
}

// Decode (T <= 4 tokens, rank <= 32, AVX-512): one walk over B's rows gives gh = gy B (rows
// expanded into registers) and grad_values (the row's lanes of gy h, compressed into place);
// Rademacher grad_x = gh A from A's sign bits. No token transposes and no fp32 A tile: the
// general path below costs ~4x more at T = 1.
void decode_backward_avx512(const at::Tensor& gy2, const BView& b, const DeltaShape& s,
                            int64_t nnz, float sc, bool need_x, bool need_values,
                            const at::Tensor& hT, const at::Tensor& gx, const at::Tensor& gv,
                            const char* op, const at::Tensor& mask, const at::Tensor& offsets) {
  const int64_t T = s.tokens, rank = s.rank, in = s.in_features;
  alignas(64) float h[kExpandMaxTokens * 32] = {};  // hT (rank, Tp) as (T, 32) rows, zero past rank
  if (need_values) {
    const float* hp = hT.data_ptr<float>();
    const int64_t Tp = hT.size(1);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t k = 0; k < rank; ++k) h[t * 32 + k] = hp[k * Tp + t];
    }
  }
  const int64_t nchunks = num_chunks(s.out_features);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nchunks));
  // Per-part gh partials summed in part order: the result does not depend on scheduling.
  std::vector<float> ghp(need_x ? static_cast<size_t>(parts * kExpandMaxTokens * 32) : 0, 0.f);
  at::Tensor gv_f = need_values && (gv.scalar_type() != at::kFloat || !gv.is_contiguous())
                        ? at::empty({nnz}, gv.options().dtype(at::kFloat))
                        : gv;
  std::atomic<int64_t> bad{-1};
  dispatch_io_type(gy2.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gyp = gy2.data_ptr<scalar_t>();
    at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t c = gy_pass_decode_avx512<scalar_t>(
            T, b, rank, nnz, gyp, need_values ? h : nullptr,
            need_x ? ghp.data() + q * kExpandMaxTokens * 32 : nullptr,
            need_values ? gv_f.data_ptr<float>() : nullptr, sc, nchunks * q / parts,
            nchunks * (q + 1) / parts);
        if (c >= 0) bad.store(c);
      }
    });
  });
  if (bad.load() >= 0) check_bitmask_cpu(op, mask, offsets, rank, nnz);  // names the problem
  TORCH_CHECK_VALUE(bad.load() < 0, op, ": mask and offsets disagree in chunk ", bad.load());
  if (need_values && !gv_f.is_same(gv)) gv.copy_(gv_f);
  if (!need_x) return;
  float gh[kExpandMaxTokens * kMaxRank];  // (T, rank), scaled
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < rank; ++k) {
      float acc = 0.f;
      for (int64_t q = 0; q < parts; ++q) acc += ghp[(q * kExpandMaxTokens + t) * 32 + k];
      gh[t * rank + k] = sc * acc;
    }
  }
  at::Tensor gx2 = gx.view({T, in});
  if (s.gen.dist != kRademacher) {
    at::Tensor ghT = at::zeros({rank, round_up8(T)}, gy2.options().dtype(at::kFloat));
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t k = 0; k < rank; ++k) ghT.data_ptr<float>()[k * ghT.size(1) + t] = gh[t * rank + k];
    }
    grad_x_from_gh(ghT, s, T, gx2);
    return;
  }
  // A multiple of 128: tiles start on Philox block edges (when the window does; see
  // grad_x_signs_impl for one that does not).
  constexpr int64_t kCols = 1024;
  dispatch_io_type(gx.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* gxp = gx2.data_ptr<scalar_t>();
    at::parallel_for(0, (in + kCols - 1) / kCols, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        grad_x_signs_avx512<scalar_t>(gh, T, rank, s.gen, j * kCols,
                                      std::min(in, (j + 1) * kCols), gxp, in);
      }
    });
  });
}

// The B side of a backward (AVX2 gy pass): B's chunks in fixed contiguous parts, each with
// its own gh partial (rank x Tp, unscaled), so the reduction order (and the result) does not
// depend on thread scheduling; grad values (scaled) in fp32. hT (rank x Tp) is read only for
// the values. Returns (gh_parts, gv_f), each undefined when not needed.
std::tuple<at::Tensor, at::Tensor> gy_pass_parts(const char* op, const BView& b,
                                                 const at::Tensor& mask,
                                                 const at::Tensor& offsets, int64_t rank,
                                                 int64_t nnz, const at::Tensor& gy2,
                                                 const at::Tensor& hT, int64_t T, int64_t Tp,
                                                 float sc, bool need_gh, bool need_values) {
  const int64_t nchunks = num_chunks(b.out);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nchunks));
  const auto f32 = gy2.options().dtype(at::kFloat);
  at::Tensor gh_parts = need_gh ? at::zeros({parts, rank, Tp}, f32) : at::Tensor();
  at::Tensor gv_f = need_values ? at::empty({nnz}, f32) : at::Tensor();
  std::atomic<int64_t> bad{-1};
  dispatch_io_type(gy2.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gyp = gy2.data_ptr<scalar_t>();
    at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t c = gy_pass_avx2<scalar_t>(
            b, rank, nnz, gyp, T, Tp, need_values ? hT.data_ptr<float>() : nullptr,
            need_gh ? gh_parts[q].data_ptr<float>() : nullptr,
            need_values ? gv_f.data_ptr<float>() : nullptr, sc, nchunks * q / parts,
            nchunks * (q + 1) / parts);
        if (c >= 0) bad.store(c);
      }
    });
  });
  if (bad.load() >= 0) check_bitmask_cpu(op, mask, offsets, rank, nnz);  // names the problem
  TORCH_CHECK_VALUE(bad.load() < 0, op, ": mask and offsets disagree in chunk ", bad.load());
  return {gh_parts, gv_f};
}

std::tuple<at::Tensor, at::Tensor> sparse_delta_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mask,
    const at::Tensor& values, const at::Tensor& offsets, int64_t rank, int64_t seed,
    c10::string_view distribution, double scale, bool need_x, bool need_values,
    const std::optional<at::Tensor>& h_in, int64_t col_start, int64_t in_features) {
  const char* op = "sparse_delta_backward";
  const DeltaShape s = check_sparse_delta_args(op, x, mask, values, offsets, rank, seed,
                                               distribution, scale, col_start, in_features);
  check_grad_y(op, grad_y, x, s);
  const int64_t T = s.tokens, Tp = round_up8(T);
  // Both are fully written below (or zero-filled on the early-return paths).
  at::Tensor gx = need_x ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                         : at::empty({0}, x.options());
  at::Tensor gv = need_values ? at::empty_like(values) : at::empty({0}, values.options());
  if (T == 0 || s.out_features == 0 || (!need_x && !need_values)) {
    gx.zero_();
    gv.zero_();
    return {gx, gv};
  }
  // A saved h (from sparse_delta_fwd) spares recomputing x @ A^T.
  const at::Tensor h_saved = checked_saved_h(op, h_in, x, s);
  const at::Tensor x2 = x.reshape({T, s.in_features});
  const at::Tensor gy2 = grad_y.reshape({T, s.out_features}).contiguous();
  if (use_generic_path(x)) {
    check_bitmask_cpu(op, mask, offsets, rank, values.numel());
    auto [gx2, gv2] =
        sparse_delta_backward_generic(gy2, x2, mask, values, s, scale, need_x, need_values,
                                      h_saved);
    if (need_x) gx.view({T, s.in_features}).copy_(gx2);
    if (need_values) gv.copy_(gv2);
    return {gx, gv};
  }
  at::Tensor hT;
  if (need_values && h_saved.defined()) {
    hT = at::zeros({rank, Tp}, x.options().dtype(at::kFloat));
    hT.narrow(1, 0, T).copy_(h_saved.t());
  } else if (need_values) {
    hT = compute_hT(x2, s);
  }
  const at::Tensor m = mask.contiguous(), vf = values_f32(values), off = offsets.contiguous();
  const BView b{reinterpret_cast<const uint32_t*>(m.data_ptr<int32_t>()), vf.data_ptr<float>(),
                off.data_ptr<int32_t>(), s.out_features, s.words};
  const int64_t nchunks = num_chunks(s.out_features), nnz = values.numel();
  check_offset_ends(op, off.data_ptr<int32_t>(), nchunks, nnz);
  const float sc = static_cast<float>(scale);
  if (T <= kExpandMaxTokens && s.words == 1 && cpu_paths().bwd_decode == Isa::kAvx512) {
    decode_backward_avx512(gy2, b, s, nnz, sc, need_x, need_values, hT, gx, gv, op, mask,
                           offsets);
    return {gx, gv};
  }
  const auto [gh_parts, gv_f] = gy_pass_parts(op, b, mask, offsets, rank, nnz, gy2, hT, T, Tp,
                                              sc, need_x, need_values);
  if (need_values) gv.copy_(gv_f);
  if (need_x) grad_x_from_gh(gh_parts.sum(0).mul_(sc), s, T, gx.view({T, s.in_features}));
  return {gx, gv};
}

// grad_x = grad_h @ A_window: the A side of the backward above on a given gh.
at::Tensor shrink_backward_cpu(const at::Tensor& grad_h, int64_t width, at::ScalarType dtype,
                               int64_t rank, int64_t seed, c10::string_view distribution,
                               int64_t col_start, int64_t in_features) {
  const DeltaShape s = check_shrink_backward_args("shrink_backward", grad_h, width, dtype, rank,
                                                  seed, distribution, col_start, in_features);
  auto shape = grad_h.sizes().vec();
  shape.back() = width;
  const int64_t T = s.tokens;
  if (T == 0) return at::zeros(shape, grad_h.options().dtype(dtype));
  const at::Tensor gh = grad_h.reshape({T, rank}).contiguous();
  if (dtype == at::kDouble || cpu_paths().generic_ops) {
    return shrink_backward_generic(gh, s, dtype).view(shape);
  }
  at::Tensor gx = at::empty({T, width}, grad_h.options().dtype(dtype));
  at::Tensor ghT = at::zeros({rank, round_up8(T)}, grad_h.options());
  ghT.narrow(1, 0, T).copy_(gh.t());
  grad_x_from_gh(ghT, s, T, gx);
  return gx.view(shape);
}

// (grad_h, grad_values) of y = scale * h @ B^T: the B side of the backward above on a given h.
std::tuple<at::Tensor, at::Tensor> expand_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& h, const at::Tensor& mask,
    const at::Tensor& values, const at::Tensor& offsets, double scale, bool need_h,
    bool need_values) {
  const char* op = "expand_backward";
  const DeltaShape s = check_expand_args(op, h, mask, values, offsets, scale);
  check_expand_grad_y(op, grad_y, h, values, s);
  const int64_t T = s.tokens, rank = s.rank, Tp = round_up8(T);
  at::Tensor gh = need_h ? at::zeros(h.sizes(), h.options()) : at::empty({0}, h.options());
  at::Tensor gv = need_values ? at::zeros_like(values) : at::empty({0}, values.options());
  if (T == 0 || s.out_features == 0 || (!need_h && !need_values)) return {gh, gv};
  const at::Tensor gy2 = grad_y.reshape({T, s.out_features}).contiguous();
  const at::Tensor h2 = h.reshape({T, rank});
  if (values.scalar_type() == at::kDouble || cpu_paths().generic_ops) {
    check_bitmask_cpu(op, mask, offsets, rank, values.numel());
    const auto acc = h.scalar_type();
    const at::Tensor gy = gy2.to(acc), b = dense_b(mask, values, rank, acc);
    if (need_h) gh.view({T, rank}).copy_(at::mm(gy, b).mul_(scale));
    if (need_values) {
      const at::Tensor gb = at::mm(gy.t(), h2).mul_(scale);  // (out, rank)
      const at::Tensor on_mask = dense_b(mask, at::ones_like(values, at::kDouble), rank,
                                         at::kDouble).to(at::kBool);
      gv.copy_(gb.masked_select(on_mask));
    }
    return {gh, gv};
  }
  at::Tensor hT;
  if (need_values) {
    hT = at::zeros({rank, Tp}, h.options());
    hT.narrow(1, 0, T).copy_(h2.t());
  }
  const at::Tensor m = mask.contiguous(), vf = values_f32(values), off = offsets.contiguous();
  const BView b{reinterpret_cast<const uint32_t*>(m.data_ptr<int32_t>()), vf.data_ptr<float>(),
                off.data_ptr<int32_t>(), s.out_features, s.words};
  const int64_t nchunks = num_chunks(s.out_features), nnz = values.numel();
  check_offset_ends(op, off.data_ptr<int32_t>(), nchunks, nnz);
  const float sc = static_cast<float>(scale);
  const auto [gh_parts, gv_f] = gy_pass_parts(op, b, mask, offsets, rank, nnz, gy2, hT, T, Tp,
                                              sc, need_h, need_values);
  if (need_values) gv.copy_(gv_f);
  if (need_h) gh.view({T, rank}).copy_(gh_parts.sum(0).mul_(sc).narrow(1, 0, T).t());
  return {gh, gv};
}

}  // namespace
}  // namespace lori::cpu

TORCH_LIBRARY_IMPL(lori, CPU, m) {
  m.impl("sparse_delta_backward", &lori::cpu::sparse_delta_backward_cpu);
  m.impl("shrink_backward", &lori::cpu::shrink_backward_cpu);
  m.impl("expand_backward", &lori::cpu::expand_backward_cpu);
}

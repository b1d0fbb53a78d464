// CPU forward of batched_sparse_delta: many adapters of one pool in one batch.
//
//   y[t] = base[t] + scales[a] * (x[t] @ A_a^T) @ B_a^T,  a = adapter_ids[t]  (a == -1: base[t])
//
// Tokens are grouped by adapter with a stable counting sort (punica SGMV / vLLM lora_shrink
// style: segments of one adapter, -1 = none), or taken from the plan arguments (built once per
// step by AdapterPool.plan; group_from_plan gives the same segments), so each adapter's A is generated once per
// group, not per token. Per segment the single-adapter pieces run unchanged: compute_hT
// (direct A-row dots for <= 16 tokens, MKL GEMM over A tiles above), then the B stage
// (b_stage.h: column-expand kernel for <= 4 tokens, 8-token kernel above) writing straight
// into the tokens' rows of y. Work is spread over (segment) items for the A stage and over
// (segment, chunk group) items for the B stage, taken dynamically by the threads, so 64
// adapters with one token each use every core as well as one long prefill segment does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "b_stage.h"
#include "batched_delta.h"
#include "delta_common.h"
#include "lori/bitmask.h"
#include "lori/philox.h"

namespace lori::cpu {

const char* distribution_name(int dist) { return dist == kRademacher ? "rademacher" : "uniform"; }

namespace {

// The pool's per-adapter tables, contiguous, for the host-side reads of the used adapters.
struct PoolMeta {
  at::Tensor vs, off, sd, sc, di;
  const int64_t* vsp;
  const int32_t* offp;
  const int64_t* sdp;
  const float* scp;
  const int32_t* dip;
  PoolMeta(const at::Tensor& value_starts, const at::Tensor& offsets, const at::Tensor& seeds,
           const at::Tensor& scales, const at::Tensor& distributions)
      : vs(value_starts.contiguous()), off(offsets.contiguous()), sd(seeds.contiguous()),
        sc(scales.contiguous()), di(distributions.contiguous()) {
    vsp = vs.data_ptr<int64_t>();
    offp = off.data_ptr<int32_t>();
    sdp = sd.data_ptr<int64_t>();
    scp = sc.data_ptr<float>();
    dip = di.data_ptr<int32_t>();
  }
};

// Segment of adapter a (perm[start, start + len)), its metadata checked.
Segment make_segment(const char* op, int64_t a, int64_t start, int64_t len, const PoolMeta& m,
                     int64_t num_values, const BatchedShape& s) {
  Segment seg;
  seg.adapter = a;
  seg.start = start;
  seg.len = len;
  const int32_t* o = m.offp + a * (s.chunks + 1);
  seg.value_start = m.vsp[a];
  seg.nnz = o[s.chunks];
  check_batched_adapter(op, a, o[0], seg.nnz, seg.value_start, num_values, m.dip[a], m.scp[a]);
  const int dist = m.dip[a];
  const uint64_t useed = static_cast<uint64_t>(m.sdp[a]);
  seg.gen.k0 = static_cast<uint32_t>(useed);
  seg.gen.k1 = static_cast<uint32_t>(useed >> 32);
  seg.gen.dist = dist;
  seg.gen.in_features = s.in_features;
  seg.gen.magnitude = a_magnitude(dist, s.in_features);
  seg.scale = m.scp[a];
  return seg;
}

void mark_contiguous(Grouping& g) {
  for (auto& seg : g.segs) {
    const int64_t* q = g.perm.data() + seg.start;
    bool run = true;
    for (int64_t j = 1; j < seg.len && run; ++j) run = q[j] == q[0] + j;
    seg.contiguous_from = run ? q[0] : -1;
  }
}

}  // namespace

Grouping group_tokens(const char* op, const at::Tensor& ids, const at::Tensor& value_starts,
                      const at::Tensor& offsets, const at::Tensor& seeds,
                      const at::Tensor& scales, const at::Tensor& distributions,
                      int64_t num_values, const BatchedShape& s) {
  TORCH_CHECK(ids.device().is_cpu(), op, ": adapter_ids must be a CPU tensor here");
  const at::Tensor id64 = ids.to(at::kLong).contiguous();
  const int64_t* id = id64.data_ptr<int64_t>();
  const int64_t T = s.tokens, N = s.adapters;
  std::vector<int64_t> count(static_cast<size_t>(N) + 1, 0);  // [0] counts id -1
  for (int64_t t = 0; t < T; ++t) {
    if (id[t] < -1 || id[t] >= N) fail_batched_id(op, t, id[t], N);
    ++count[id[t] + 1];
  }
  Grouping g;
  g.perm.resize(static_cast<size_t>(T - count[0]));
  g.idle.reserve(static_cast<size_t>(count[0]));
  std::vector<int64_t> pos(static_cast<size_t>(N) + 1, 0);
  const PoolMeta meta(value_starts, offsets, seeds, scales, distributions);
  int64_t p = 0;
  for (int64_t a = 0; a < N; ++a) {
    pos[a + 1] = p;
    if (count[a + 1] == 0) continue;
    g.segs.push_back(make_segment(op, a, p, count[a + 1], meta, num_values, s));
    p += count[a + 1];
  }
  for (int64_t t = 0; t < T; ++t) {
    if (id[t] < 0) {
      g.idle.push_back(t);
    } else {
      g.perm[pos[id[t] + 1]++] = t;
    }
  }
  mark_contiguous(g);
  return g;
}

Grouping group_from_plan(const char* op, const at::Tensor& ids, const BatchedPlan& plan,
                         const at::Tensor& value_starts, const at::Tensor& offsets,
                         const at::Tensor& seeds, const at::Tensor& scales,
                         const at::Tensor& distributions, int64_t num_values,
                         const BatchedShape& s) {
  if (validation_level() >= 2) verify_batched_plan(op, ids, plan, s.adapters);
  const at::Tensor order = plan.order.contiguous(), starts = plan.starts.contiguous();
  const at::Tensor adapters = plan.adapters.contiguous();
  const int64_t T = s.tokens, G = adapters.numel();
  const int32_t* op_ = order.data_ptr<int32_t>();
  const int32_t* sp = starts.data_ptr<int32_t>();
  const int32_t* ap = adapters.data_ptr<int32_t>();
  check_plan_bounds(op, sp, ap, G, T, s.adapters);
  Grouping g;
  g.perm.resize(static_cast<size_t>(T));
  for (int64_t p = 0; p < T; ++p) {
    // Trusted for its grouping ("on"), but never for memory: a token index stays inside x.
    TORCH_CHECK_VALUE(op_[p] >= 0 && op_[p] < T, op, ": plan_order[", p, "] = ", op_[p],
                      " is not a token index (0..", T - 1, ")");
    g.perm[p] = op_[p];
  }
  const PoolMeta meta(value_starts, offsets, seeds, scales, distributions);
  for (int64_t i = 0; i < G; ++i) {
    const int64_t start = sp[i], len = sp[i + 1] - sp[i];
    if (ap[i] < 0) {
      g.idle.assign(g.perm.begin() + start, g.perm.begin() + start + len);
    } else {
      g.segs.push_back(make_segment(op, ap[i], start, len, meta, num_values, s));
    }
  }
  mark_contiguous(g);
  return g;
}

std::string adapter_op(const char* op, int64_t a) {
  return std::string(op) + " (adapter " + std::to_string(a) + ")";
}

namespace {

DeltaShape segment_shape(const BatchedShape& s, const Segment& seg) {
  DeltaShape d;
  d.tokens = seg.len;
  d.in_features = s.in_features;
  d.out_features = s.out_features;
  d.rank = s.rank;
  d.words = s.words;
  d.gen = seg.gen;
  return d;
}

// x's rows of a segment: a view when they are consecutive tokens, else a gather.
at::Tensor segment_rows(const at::Tensor& x2, const at::Tensor& perm, const Segment& seg) {
  if (seg.contiguous_from >= 0) return x2.narrow(0, seg.contiguous_from, seg.len);
  return x2.index_select(0, perm.narrow(0, seg.start, seg.len));
}

template <typename scalar_t>
LORI_AVX2 void to_f32(const scalar_t* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, load8(src + j));
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// Runs f(i) for i in [0, n), items taken dynamically by the intra-op threads (or inline).
template <typename F>
void for_each_item(int64_t n, F&& f) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(i);
  });
}

at::Tensor batched_sparse_delta_cpu(const at::Tensor& x, const at::Tensor& ids,
                                    const at::Tensor& masks, const at::Tensor& values,
                                    const at::Tensor& value_starts, const at::Tensor& offsets,
                                    const at::Tensor& seeds, const at::Tensor& scales,
                                    const at::Tensor& distributions, int64_t rank,
                                    const std::optional<at::Tensor>& base,
                                    const std::optional<at::Tensor>& plan_order,
                                    const std::optional<at::Tensor>& plan_starts,
                                    const std::optional<at::Tensor>& plan_adapters) {
  const char* op = "batched_sparse_delta";
  const BatchedShape s = check_batched_args(op, x, ids, masks, values, value_starts, offsets,
                                            seeds, scales, distributions, rank);
  const BatchedPlan plan = check_batched_plan(op, plan_order, plan_starts, plan_adapters, x, s);
  const bool accumulate = base.has_value() && base->defined();
  if (accumulate) check_batched_out_like(op, "base", *base, x, s);
  auto out_shape = x.sizes().vec();
  out_shape.back() = s.out_features;
  at::Tensor y = accumulate ? base->clone(at::MemoryFormat::Contiguous)
                            : at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t T = s.tokens, out = s.out_features;
  const Grouping g =
      plan.given ? group_from_plan(op, ids, plan, value_starts, offsets, seeds, scales,
                                   distributions, values.numel(), s)
                 : group_tokens(op, ids, value_starts, offsets, seeds, scales, distributions,
                                values.numel(), s);
  if (T == 0 || out == 0) return y;
  at::Tensor y2 = y.view({T, out});
  if (!accumulate && !g.idle.empty()) {
    if (g.idle.size() == static_cast<size_t>(T)) return y.zero_();
    y2.index_fill_(0, at::tensor(g.idle, at::kLong), 0);
  }
  if (g.segs.empty()) return y;
  const at::Tensor x2 = x.reshape({T, s.in_features});
  const at::Tensor perm = at::from_blob(const_cast<int64_t*>(g.perm.data()),
                                        {static_cast<int64_t>(g.perm.size())}, at::kLong);
  const at::Tensor m = masks.contiguous(), off = offsets.contiguous();
  const auto* mp = reinterpret_cast<const uint32_t*>(m.data_ptr<int32_t>());
  const int32_t* offp = off.data_ptr<int32_t>();
  const int64_t nseg = static_cast<int64_t>(g.segs.size());

  if (use_generic_path(x)) {  // float64 (gradcheck) and CPUs without AVX2
    for (const Segment& seg : g.segs) {
      const int64_t a = seg.adapter;
      const at::Tensor mk = m[a], of = off[a], v = values.narrow(0, seg.value_start, seg.nnz);
      check_bitmask_cpu(adapter_op(op, a).c_str(), mk, of, rank, seg.nnz);
      // With base, the delta stays in the accumulation dtype until base + delta is rounded
      // once into y's dtype (the spec's accumulate form).
      const at::Tensor ys = sparse_delta_generic(segment_rows(x2, perm, seg), mk, v,
                                                 segment_shape(s, seg), seg.scale, nullptr,
                                                 accumulate);
      const at::Tensor idx = perm.narrow(0, seg.start, seg.len);
      if (accumulate) {
        y2.index_copy_(0, idx, y2.index_select(0, idx).to(ys.scalar_type()).add_(ys).to(y2.scalar_type()));
      } else {
        y2.index_copy_(0, idx, ys);
      }
    }
    return y;
  }

  // B values as fp32: the pool's own buffer when it is fp32, else the used extents converted.
  // readable[i]: values readable from vptr[i] (lets the B kernels use plain 8-wide loads).
  std::vector<const float*> vptr(static_cast<size_t>(nseg));
  std::vector<int64_t> readable(static_cast<size_t>(nseg));
  at::Tensor vconv;  // keeps a contiguous copy of fp32 values alive
  if (values.scalar_type() == at::kFloat) {
    const at::Tensor vc = values.contiguous();  // a view for the pool's (contiguous) buffer
    for (int64_t i = 0; i < nseg; ++i) {
      vptr[i] = vc.data_ptr<float>() + g.segs[i].value_start;
      readable[i] = vc.numel() - g.segs[i].value_start;
    }
    vconv = vc;
  } else {
    std::vector<int64_t> at_(static_cast<size_t>(nseg) + 1, 0);
    for (int64_t i = 0; i < nseg; ++i) at_[i + 1] = at_[i] + g.segs[i].nnz;
    // Reused across calls on this thread (grow-only): a fresh multi-MB buffer per call would
    // cost a page fault per 4 KiB.
    thread_local std::vector<float> scratch;
    if (scratch.size() < static_cast<size_t>(at_[nseg] + 8)) scratch.resize(at_[nseg] + 8);
    float* dst = scratch.data();
    for (int64_t i = 0; i < nseg; ++i) {
      vptr[i] = dst + at_[i];
      readable[i] = at_[nseg] + 8 - at_[i];
    }
    const at::Tensor vc = values.contiguous();
    dispatch_io_type(values.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      const scalar_t* src = vc.data_ptr<scalar_t>();
      for_each_item(nseg, [&](int64_t i) {
        to_f32(src + g.segs[i].value_start, dst + at_[i], g.segs[i].nnz);
      });
    });
  }

  // Stage 1: hT (rank, round_up8(len)) per segment. Small segments (direct path) are items
  // of one parallel loop writing into one buffer, straight from x's rows (no ATen op per
  // segment: with 64 one-token adapters those were a tenth of the batch); GEMM-sized ones
  // (and a few small ones) parallelize inside.
  std::vector<at::Tensor> hT_big(static_cast<size_t>(nseg));
  std::vector<const float*> hptr(static_cast<size_t>(nseg));
  std::vector<int64_t> hld(static_cast<size_t>(nseg));
  std::vector<int64_t> small, hat(static_cast<size_t>(nseg), -1);
  int64_t hsize = 0;
  for (int64_t i = 0; i < nseg; ++i) {
    if (g.segs[i].len <= kDirectMaxTokens) {
      small.push_back(i);
      hat[i] = hsize;
      hsize += rank * round_up8(g.segs[i].len);
    }
  }
  const bool items = static_cast<int64_t>(small.size()) >= 2 * at::get_num_threads();
  for (int64_t i = 0; i < nseg; ++i) {
    if (items && g.segs[i].len <= kDirectMaxTokens) continue;
    hT_big[i] = compute_hT(segment_rows(x2, perm, g.segs[i]), segment_shape(s, g.segs[i]));
    hptr[i] = hT_big[i].data_ptr<float>();
    hld[i] = hT_big[i].size(1);
  }
  std::vector<float> hbuf;
  if (items) {
    hbuf.assign(static_cast<size_t>(hsize), 0.f);  // zero padding columns
    const at::Tensor xc = x2.contiguous();
    const bool f32 = xc.scalar_type() == at::kFloat;
    for_each_item(static_cast<int64_t>(small.size()), [&](int64_t j) {
      const int64_t i = small[j];
      const Segment& seg = g.segs[i];
      const int64_t in = s.in_features;
      const float* rows;
      thread_local std::vector<float> xbuf;  // gathered / converted rows
      if (f32 && seg.contiguous_from >= 0) {
        rows = xc.data_ptr<float>() + seg.contiguous_from * in;
      } else {
        if (xbuf.size() < static_cast<size_t>(seg.len * in)) xbuf.resize(seg.len * in);
        dispatch_io_type(xc.scalar_type(), [&](auto tag) {
          using scalar_t = decltype(tag);
          const scalar_t* xp = xc.data_ptr<scalar_t>();
          for (int64_t t = 0; t < seg.len; ++t) {
            to_f32(xp + g.perm[seg.start + t] * in, xbuf.data() + t * in, in);
          }
        });
        rows = xbuf.data();
      }
      const int64_t ld = round_up8(seg.len);
      compute_hT_direct(rows, seg.len, in, segment_shape(s, seg), hbuf.data() + hat[i], ld);
      hptr[i] = hbuf.data() + hat[i];
      hld[i] = ld;
    });
  }

  // Stage 2: B per (segment, group of chunks).
  // Work items of `group` chunks: small enough to balance many segments across threads, as
  // large as an even split when there are few (a long segment then walks its chunks the way
  // sparse_delta does).
  const int64_t nthreads = at::get_num_threads();
  const int64_t group = std::max<int64_t>(4, (nseg * s.chunks) / std::max<int64_t>(1, nthreads) / nseg);
  const int64_t per_seg = (s.chunks + group - 1) / group, hw = s.words * 32;
  std::atomic<int64_t> bad{-1};
  dispatch_io_type(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* yp = y2.data_ptr<scalar_t>();
    for_each_item(nseg * per_seg, [&](int64_t item) {
      const int64_t i = item / per_seg, c0 = (item % per_seg) * group;
      const int64_t c1 = std::min(s.chunks, c0 + group);
      const Segment& seg = g.segs[i];
      const int64_t a = seg.adapter;
      const BView b{mp + a * out * s.words, vptr[i], offp + a * (s.chunks + 1), out, s.words};
      const float* h = hptr[i];
      const int64_t Tp = hld[i];
      const int64_t* tok = g.perm.data() + seg.start;
      int64_t c;
      if (seg.len <= kExpandMaxTokens) {
        alignas(32) float hrow[kExpandMaxTokens * kMaxRank];
        std::fill(hrow, hrow + seg.len * hw, 0.f);
        for (int64_t t = 0; t < seg.len; ++t) {
          for (int64_t k = 0; k < rank; ++k) hrow[t * hw + k] = h[k * Tp + t];
        }
        c = apply_b_expand_any<scalar_t>(seg.len, b, rank, seg.nnz, hrow, hw, seg.scale, yp,
                                         c0, c1, tok, accumulate, readable[i]);
      } else {
        c = apply_b_avx2<scalar_t>(b, rank, seg.nnz, h, seg.len, Tp, seg.scale, yp, c0, c1,
                                   tok, accumulate);
      }
      if (c >= 0) bad.store(a);
    });
  });
  if (bad.load() >= 0) {
    const int64_t a = bad.load();
    int64_t nnz = 0;
    for (const auto& seg : g.segs) {
      if (seg.adapter == a) nnz = seg.nnz;
    }
    check_bitmask_cpu(adapter_op(op, a).c_str(), m[a], off[a], rank, nnz);  // names the problem
    TORCH_CHECK_VALUE(false, op, ": adapter ", a, "'s mask and offsets disagree");
  }
  return y;
}

}  // namespace
}  // namespace lori::cpu

TORCH_LIBRARY_IMPL(lori, CPU, m) {
  m.impl("batched_sparse_delta", &lori::cpu::batched_sparse_delta_cpu);
}

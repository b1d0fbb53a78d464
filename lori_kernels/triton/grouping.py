"""Tokens grouped by adapter for the batched kernels (forward and backward), on the ids'
device with torch ops and no host sync, punica SGMV / vLLM lora_shrink style.

A stable sort of the ids gives `perm` (token of each sorted position; id -1 tokens first) and
segments of equal ids. Tokens are never moved: kernels gather x / grad_y rows and scatter
y / grad_x rows through perm. Two tables, both sized by bounds known on the host so that no
count is read back:
  segs (S, 3) int32  [adapter, first sorted position, length], S = min(T, N + 1);
                     unused rows have adapter -2.
  work (W, 3) int32  [adapter, first sorted position, rows] per BLOCK_T-token tile of a segment,
                     W = cdiv(T, BLOCK_T) + S >= the real tile count; unused rows adapter -2.
`load_item` is the kernels' side of a table row.

With a plan (plan_order, plan_starts, plan_adapters: the op schema's comment) the sort is
skipped: perm = plan_order and the tables are cut from the plan's G groups (S = G).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

NO_WORK = -2   # adapter entry of unused table rows
IDLE = -1      # tokens without an adapter


@dataclasses.dataclass
class Groups:
    perm: torch.Tensor   # (T,) int32: token index of each sorted position
    segs: torch.Tensor   # (S, 3) int32: adapter, start, length
    work: torch.Tensor   # (W, 3) int32: adapter, start, rows (<= block_t)


def group_tokens(ids: torch.Tensor, n_adapters: int, block_t: int) -> Groups:
    """Stable grouping of tokens by adapter id, as tables sized by host-known bounds."""
    T = ids.numel()
    dev = ids.device
    ids = ids.reshape(-1).to(torch.int32)
    # Never index past the pool, even if the op's id check was skipped.
    ids = torch.where((ids >= IDLE) & (ids < n_adapters), ids, IDLE)
    sorted_ids, perm = torch.sort(ids, stable=True)
    S = min(T, n_adapters + 1)
    head = torch.ones(T, dtype=torch.bool, device=dev)
    head[1:] = sorted_ids[1:] != sorted_ids[:-1]
    seg_of = torch.cumsum(head, 0) - 1
    pos = torch.arange(T, dtype=torch.int64, device=dev)
    # starts[s] = first sorted position of segment s (T for unused s); non-heads go to the
    # spare slot S. amin keeps it deterministic with the duplicate indices there.
    starts = torch.full((S + 1,), T, dtype=torch.int64, device=dev)
    starts.scatter_reduce_(0, torch.where(head, seg_of, S), pos, reduce="amin")
    starts[S] = T
    lens = starts[1:] - starts[:-1]
    seg_ad = torch.where(lens > 0, sorted_ids[starts[:-1].clamp(max=T - 1)].long(), NO_WORK)
    return _tables(perm.to(torch.int32), seg_ad, starts, lens, T, block_t)


def groups_from_plan(order: torch.Tensor, starts: torch.Tensor, adapters: torch.Tensor,
                     n_adapters: int, block_t: int) -> Groups:
    """The tables from a plan, without sorting. A plan is trusted for its grouping, never for
    memory: token indices are clamped into [0, T), group bounds into [0, T], and adapters
    outside [-1, N) act as -1 (no adapter)."""
    T = order.numel()
    dev = order.device
    perm = order.to(torch.int32).clamp(0, max(T - 1, 0))
    st = starts.to(torch.int64).clamp(0, T)
    ad = adapters.to(torch.int64)
    if ad.numel() == 0:  # no group (only a malformed plan has none for T > 0)
        st = torch.zeros(2, dtype=torch.int64, device=dev)
        ad = torch.full((1,), NO_WORK, dtype=torch.int64, device=dev)
    st = torch.cummax(st, 0).values  # non-decreasing: no negative length
    lens = st[1:] - st[:-1]
    seg_ad = torch.where((ad >= IDLE) & (ad < n_adapters), ad, IDLE)
    seg_ad = torch.where(lens > 0, seg_ad, NO_WORK)
    return _tables(perm, seg_ad, st, lens, T, block_t)


def _tables(perm, seg_ad, starts, lens, T: int, block_t: int) -> Groups:
    """segs and work from S segments: seg_ad (S,), starts (S + 1,), lens (S,), int64."""
    dev = perm.device
    S = seg_ad.numel()
    segs = torch.stack([seg_ad, starts[:-1], lens], 1).to(torch.int32)
    tiles = (lens + block_t - 1) // block_t
    cum = torch.cumsum(tiles, 0)
    W = triton.cdiv(T, block_t) + S
    w = torch.arange(W, dtype=torch.int64, device=dev)
    s = torch.searchsorted(cum, w, right=True)
    sc = s.clamp(max=S - 1)
    p0 = starts[sc] + (w - (cum[sc] - tiles[sc])) * block_t
    rows = torch.minimum(starts[sc] + lens[sc] - p0, torch.full_like(p0, block_t))
    work_ad = torch.where(s < S, seg_ad[sc], NO_WORK)
    work = torch.stack([work_ad, p0, rows], 1).to(torch.int32)
    return Groups(perm, segs, work)


@triton.jit
def load_item(table_ptr, i, BLOCK_T: tl.constexpr):
    """(adapter, sorted positions, in-range flags) of row i of a segs or work table."""
    a = tl.load(table_ptr + i * 3)
    p0 = tl.load(table_ptr + i * 3 + 1)
    n = tl.load(table_ptr + i * 3 + 2)
    offs_p = p0 + tl.arange(0, BLOCK_T)
    t_ok = tl.arange(0, BLOCK_T) < n
    return a, offs_p, t_ok

"""Calibration over values sharded across ranks (FSDP2 / DTensor values)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def global_threshold(magnitudes: list[torch.Tensor], k: int, group=None) -> float:
    """The k-th largest value over the union, across the ranks of `group`, of each rank's
    `magnitudes` (non-negative float tensors, e.g. |values| shards): exactly what
    torch.kthvalue would give on the gathered values, without gathering them.

    Bisection over the fp32 bit pattern (for non-negative floats, ordered like the values):
    32 all-reduces of one int64 count (|v| >= t) each, so the bytes sent do not grow with B.
    Every rank must call it with the same k (the global count kept)."""
    flat = torch.cat([_local(m).detach().float().flatten() for m in magnitudes]) \
        if magnitudes else torch.zeros(0)
    if flat.numel() and (flat < 0).any():
        raise ValueError("magnitudes must be non-negative")
    bits = flat.cpu().view(torch.int32).to(torch.int64)
    dev = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.tensor([bits.numel()], dtype=torch.int64, device=dev)
    dist.all_reduce(total, group=group)
    if not 1 <= k <= int(total):
        raise ValueError(f"k must be in [1, {int(total)}] (the global count), got {k}")
    lo, hi = 0, 0x7F800000  # [0, +inf]: the answer's bit pattern is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        c = torch.tensor([int((bits >= mid).sum())], dtype=torch.int64, device=dev)
        dist.all_reduce(c, group=group)
        if int(c) >= k:
            lo = mid  # at least k entries >= mid: the k-th largest is >= mid
        else:
            hi = mid - 1
    return float(torch.tensor([lo], dtype=torch.int32).view(torch.float32))

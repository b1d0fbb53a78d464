"""Cross-rank agreement on every LoRI adapter's recipe and mask."""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

from ..workflow.inject import canonical_name, lori_layers

FIELDS = ("seed", "distribution", "rank", "alpha", "in_features", "out_features", "phase",
          "nnz", "mask")


class VerifyError(RuntimeError):
    """Ranks disagree on an adapter (raised on every rank with the same message)."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = _local(t).detach().contiguous().cpu()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def fingerprint(model: nn.Module) -> dict[str, dict]:
    """{canonical layer name + '/' + adapter name: recipe fields and the mask's hash}. A mask
    that is itself a DTensor (tensor-parallel rows) is hashed over this rank's rows only and
    marked so: ranks legitimately differ there."""
    out = {}
    for name, layer in lori_layers(model).items():
        cname = canonical_name(model, name)
        for aname, ad in layer.adapters.items():
            sharded = hasattr(ad.mask, "to_local")
            out[f"{cname}/{aname}"] = {
                "seed": None if ad.seed is None else str(ad.seed),
                "distribution": ad.distribution, "rank": ad.rank, "alpha": ad.alpha,
                "in_features": ad.in_features, "out_features": ad.out_features,
                "phase": ad.phase, "nnz": int(ad.values.numel()),
                "mask": "row-sharded" if sharded else _digest(ad.mask, ad.offsets),
                "explicit_a": None if ad.a is None else _digest(ad.a),
            }
    return out


def verify(model: nn.Module, group=None) -> dict[str, dict]:
    """Check that every rank of `group` holds the same LoRI adapters: same layers (canonical
    names), and per adapter the same seed, distribution, rank, alpha, shapes, phase, nnz and
    mask (hash of the mask words and offsets). Call it on every rank, e.g. after inject and
    after calibrate / to_sparse and before (re-)wrapping in DDP: DDP's construction broadcasts
    rank 0's buffers and would hide disagreeing masks.

    One all_gather_object, reached by every rank whatever its model holds; every rank then
    computes the same comparison from the same gathered data, so a disagreement raises the
    same VerifyError on every rank (none is left waiting in a collective). Returns this
    rank's fingerprint."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("verify: torch.distributed is not initialized (init_process_group "
                           "first)")
    mine = fingerprint(model)
    world = dist.get_world_size(group)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    problems = []
    ref = gathered[0]
    for r in range(1, world):
        other = gathered[r]
        missing = sorted(set(ref) - set(other))
        extra = sorted(set(other) - set(ref))
        if missing:
            problems.append(f"rank {r} lacks {len(missing)} adapter layers rank 0 has (first: "
                            f"{missing[:3]})")
        if extra:
            problems.append(f"rank {r} has {len(extra)} adapter layers rank 0 lacks (first: "
                            f"{extra[:3]})")
        for key in sorted(set(ref) & set(other)):
            for f in ref[key]:
                a, b = ref[key][f], other[key][f]
                if a != b and not (f == "mask" and "row-sharded" in (a, b)):
                    problems.append(f"{key}: {f} is {a!r} on rank 0 but {b!r} on rank {r}")
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise VerifyError("LoRI adapters differ across ranks, training would silently be wrong: "
                          + "; ".join(problems[:8]) + more)
    return mine

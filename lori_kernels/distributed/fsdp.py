"""LoRI under FSDP2 (torch.distributed.fsdp.fully_shard): values and base weights sharded as
DTensors (Shard(0) on the flat values and on W's rows).

What works on a sharded model (docs/distributed.md, "FSDP2"):
- calibrate_masks(model, s, apply=False): the exact global threshold over the local shards
  (`global_threshold`, B never gathered), each rank's mask bits gathered packed (1 bit per
  entry), so every rank gets the full masks, equal to one process's;
- save_adapter / LoRIModel.save_pretrained: values gathered (full_tensor), rank 0 writes, the
  outcome (bytes, or rank 0's error) is broadcast so that every rank returns or raises alike;
- merge / unmerge: each rank adds the delta to its own rows of W (B's rows for them gathered:
  out x rank values, small next to W);
- DCP (torch.distributed.checkpoint) in either phase; `match_checkpoint` gives a fresh,
  unsharded model the checkpoint's B structure (LoRI-S: the mask's nnz) before fully_shard.
What is refused: the phase switch (to_sparse, calibrate_masks(apply=True)) on a sharded model.
It replaces each values Parameter by one of another size, and FSDP2 keeps its own sharded
copy of the old one: the next forward would all-gather the old values (a silent wrong result)
or fail on sizes. Switch on the unsharded model, then fully_shard.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


class ShardedSwitchError(RuntimeError):
    """The LoRI-D -> LoRI-S switch (or a change of B's structure) on an FSDP2-sharded model."""


SWITCH_ORDER = (
    "Under FSDP2 compute the masks with calibrate_masks(model, sparsity, apply=False) (exact, "
    "the same masks on every rank), then switch an unsharded model and shard it again: "
    "fresh = <build and inject as before>; lori_kernels.to_sparse(fresh, masks) (init='keep' "
    "needs the LoRI-D values: load_adapter the file save_adapter wrote first); fully_shard(...) "
    "on it; build the optimizer over its parameters. The order: inject -> fully_shard -> "
    "LoRI-D training -> calibrate(apply=False) -> to_sparse on an unsharded model -> "
    "fully_shard -> LoRI-S training.")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def is_dtensor(t) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """t as a plain tensor (a DTensor gathered: a collective every rank of its mesh must
    reach)."""
    return t.full_tensor() if is_dtensor(t) else t


def fsdp_managed(module: nn.Module) -> bool:
    """`module` is under a fully_shard (FSDP2 marks every module it manages). Inside a forward
    (or after one with reshard_after_forward=False) its parameters are plain unsharded
    tensors, so the parameter type alone does not tell."""
    return bool(getattr(module, "_is_fsdp_managed_module", False))


def adapter_sharded(ad: nn.Module) -> bool:
    return fsdp_managed(ad) or is_dtensor(ad.values)


def check_switchable(model: nn.Module, adapters: dict[str, nn.Module], what: str) -> None:
    """Raise ShardedSwitchError (before any change) when one of `adapters` ({layer: adapter})
    is sharded: see SWITCH_ORDER."""
    sharded = [n for n, ad in adapters.items() if adapter_sharded(ad)]
    if sharded:
        raise ShardedSwitchError(
            f"{what}: the adapters of {len(sharded)} layers are sharded by FSDP2 (first: "
            f"{sharded[:2]}). The switch replaces each values Parameter by one of another "
            "size, which FSDP2 does not re-shard: the next forward would all-gather the old "
            "values or fail. Nothing was changed. " + SWITCH_ORDER)


def shard_info(t: torch.Tensor, what: str):
    """(start, end, group, group rank, group size) of this rank's part of a DTensor sharded
    Shard(0) on one mesh dimension (Replicate on the others), by torch.chunk's rule."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, places = t.device_mesh, t.placements
    dims = [i for i, p in enumerate(places) if isinstance(p, Shard)]
    if len(dims) != 1 or places[dims[0]].dim != 0 or \
            any(not isinstance(p, (Shard, Replicate)) for p in places):
        raise NotImplementedError(f"{what}: only DTensors sharded Shard(0) on one mesh "
                                  f"dimension (FSDP2's default) are handled, got {places}")
    d = dims[0]
    group, world = mesh.get_group(d), mesh.size(d)
    r = mesh.get_local_rank(d)
    n = t.shape[0]
    chunk = -(-n // world)
    start = min(r * chunk, n)
    end = min(start + chunk, n)
    if _local(t).shape[0] != end - start:
        raise NotImplementedError(f"{what}: this rank holds {_local(t).shape[0]} rows, not "
                                  f"the {end - start} of torch.chunk's rule")
    return start, end, group, r, world


def _comm_device(group) -> torch.device:
    """Where a collective's tensors must live: NCCL takes CUDA tensors only."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_bits(local: torch.Tensor, n: int, group, world: int) -> torch.Tensor:
    """The bool (n,) made of every rank's `local` part (chunk rule), sent packed 8 per byte."""
    dev = _comm_device(group)
    chunk = -(-n // world)
    nbytes = -(-chunk // 8)
    bits = torch.zeros(nbytes * 8, dtype=torch.uint8)
    bits[:local.numel()] = local.cpu().to(torch.uint8)
    weights = 1 << torch.arange(8, dtype=torch.int32)
    packed = (bits.view(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8).to(dev)
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed, group=group)
    allbits = (torch.stack(parts).cpu().to(torch.int32).unsqueeze(-1) & weights).ne(0)
    return allbits.view(world, nbytes * 8)[:, :chunk].reshape(-1)[:n]


@torch.no_grad()
def group_masks(adapters: dict[str, nn.Module], sparsity: float) -> tuple[dict, bool]:
    """calibrate_masks for one group of layers of which some are sharded: the exact
    threshold of the group's |B| by global_threshold over the local shards (a replicated,
    unsharded adapter counted once, by the group's rank 0), then every mask assembled on
    every rank. Returns ({layer: bool (out, rank)}, whether all of B was zero)."""
    groups = set()
    local = {}
    for n, ad in adapters.items():
        if is_dtensor(ad.values):
            s, e, g, r, w = shard_info(ad.values, f"{n}: values")
            groups.add(g)
            local[n] = (s, e, g, w, _local(ad.values).detach().float().abs())
    if len(groups) != 1:
        raise NotImplementedError("calibrate_masks: the layers of one scope group are sharded "
                                  "over different process groups")
    group = groups.pop()
    first = dist.get_rank(group) == 0
    mags, total = [], 0
    for n, ad in adapters.items():
        total += ad.out_features * ad.rank
        if n in local:
            mags.append(local[n][4])
        elif first:
            mags.append(ad.values.detach().float().abs())
    nonzero = torch.tensor([sum(int(m.count_nonzero()) for m in mags)], dtype=torch.int64,
                           device=_comm_device(group))
    dist.all_reduce(nonzero, group=group)
    k = max(1, int((1.0 - sparsity) * total))
    threshold = global_threshold(mags, k, group)
    masks = {}
    for n, ad in adapters.items():
        if n in local:
            s, e, g, w, m = local[n]
            flat = _gather_bits(m >= threshold, ad.values.shape[0], g, w)
        else:
            flat = ad.values.detach().float().abs() >= threshold
        masks[n] = flat.view(ad.out_features, ad.rank).to(ad.mask.device)
    return masks, int(nonzero) == 0


def model_sharded(model: nn.Module) -> bool:
    """Some LoRI value or base weight of `model` is an FSDP2/DTensor shard."""
    from ..workflow.inject import lori_layers

    return any(is_dtensor(ad.values) or is_dtensor(layer.base.weight) or fsdp_managed(ad)
               for layer in lori_layers(model).values() for ad in layer.adapters.values())


def on_rank0(fn, what: str):
    """Run fn() on rank 0 of the default group only; broadcast what it returned, or its
    error, so that every rank returns the same value or raises (rank 0 its own error, the
    others a RuntimeError naming it): no rank is left waiting."""
    if dist.get_rank() == 0:
        try:
            out = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            out = ("error", f"{type(e).__name__}: {e}")
            err = e
        box = [out]
        dist.broadcast_object_list(box, src=0)
        if out[0] == "error":
            raise err
        return out[1]
    box = [None]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"{what} failed on rank 0 (which writes): {value}")
    return value


# ---- merge into W's row shards ----------------------------------------------------------------

@torch.no_grad()
def apply_terms_sharded(layer: nn.Module, terms, sign: float) -> None:
    """W[rows of this rank] += sign * sum of terms' coef * B_b[rows] A_a, in place on the
    local shard of W (FSDP2 all-gathers it from there at the next forward). Every rank of
    W's mesh must call it (B's values are gathered when sharded)."""
    from ..packing import PackedB
    from .. import ops

    w = layer.base.weight
    if layer.fan_in_fan_out:
        raise NotImplementedError("merge of a sharded Conv1D base (weight (in, out)) is not "
                                  "implemented: merge before fully_shard")
    if not is_dtensor(w):
        raise RuntimeError("merge: the base weight is under FSDP2 but not sharded now (inside a "
                           "forward, or after one with reshard_after_forward=False): call "
                           "model.reshard() first, so that the merge changes the shard FSDP2 "
                           "gathers from")
    r0, r1, _, _, _ = shard_info(w, "merge: base weight")
    wl = w.to_local()
    for b_name, a_name, coef in terms:
        b, a = layer.adapters[b_name], layer.adapters[a_name]
        vals = full(b.values.detach())  # every rank, in the same order
        if r1 == r0:
            continue  # this rank holds no row of W
        part = PackedB(b.mask, vals, b.offsets, b.rank).row_slice(r0, r1)
        c = float(sign * coef)
        if a.a is None:
            ops._merge_delta_(wl, part.mask, part.values.to(wl.dtype), part.offsets, b.rank,
                              a.seed_op, a.distribution, c, layer.backend)
        else:
            delta = part.to_dense().float() @ a.a.float()
            wl.add_(delta.mul_(c).to(wl.dtype))


# ---- DCP ---------------------------------------------------------------------------------------

@torch.no_grad()
def match_checkpoint(model: nn.Module, checkpoint_id: str | os.PathLike) -> list[str]:
    """Give every LoRI adapter of `model` the B structure stored in the DCP checkpoint at
    `checkpoint_id` (a torch.distributed.checkpoint directory saved from model.state_dict()):
    where the checkpoint's values have another size (a LoRI-S checkpoint, whose size is its
    mask's nnz, into a fresh LoRI-D model), the adapter takes the checkpoint's mask, offsets
    and phase (values zero until dcp.load fills them). Call it on every rank on the UNSHARDED
    model, before fully_shard; then shard, dcp.load(sd := model.state_dict(), ...) and
    model.load_state_dict(sd). On a sharded model a mismatch raises ValueError (nothing
    changed) and no mismatch is a no-op. Returns the changed adapters' state-dict prefixes."""
    import torch.distributed.checkpoint as dcp

    from ..nn.linear import RECIPE_IDENTITY, LoRIAdapter, decode_recipe
    from ..packing import validate_packed

    md = dcp.FileSystemReader(os.fspath(checkpoint_id)).read_metadata().state_dict_metadata
    todo = {}
    for mname, m in model.named_modules():
        if not isinstance(m, LoRIAdapter):
            continue
        prefix = f"{mname}."
        key = prefix + "values"
        if key not in md:
            raise ValueError(f"{checkpoint_id}: no {key!r} in the checkpoint (another model, or "
                             "saved from a wrapper whose state-dict names differ?)")
        size = tuple(md[key].size)
        if size != tuple(m.values.shape):
            todo[prefix] = (m, size)
    if not todo:
        return []
    sharded = [p for p, (m, _) in todo.items() if adapter_sharded(m)]
    if sharded:
        p = sharded[0]
        raise ValueError(
            f"{checkpoint_id}: {p}values has {todo[p][1][0]} entries in the checkpoint but "
            f"{todo[p][0].values.shape[0]} in the model ({len(sharded)} adapters differ: the "
            "checkpoint is of another phase, e.g. LoRI-S, whose size is the mask's nnz), and "
            "the model is already sharded, which cannot change a Parameter's size. Call "
            "lori_kernels.distributed.match_checkpoint(model, checkpoint_id) on the unsharded "
            "model before fully_shard, then fully_shard and dcp.load. Nothing was changed.")
    want = {}
    for prefix, (m, _) in todo.items():
        for k in ("mask", "offsets", "_extra_state"):
            meta = md.get(prefix + k)
            if meta is None or not hasattr(meta, "size"):
                raise ValueError(f"{checkpoint_id}: {prefix}{k} is not a tensor in the "
                                 "checkpoint")
            want[prefix + k] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    dcp.load(want, checkpoint_id=os.fspath(checkpoint_id))
    checked = {}
    for prefix, (m, size) in todo.items():  # every adapter checked before any changes
        recipe = decode_recipe(want[prefix + "_extra_state"], prefix + "_extra_state")
        mine = m.recipe()
        for field in RECIPE_IDENTITY:
            if recipe[field] != mine[field]:
                raise ValueError(f"{checkpoint_id}: {prefix}_extra_state: {field} is "
                                 f"{recipe[field]!r} in the checkpoint but {mine[field]!r} in "
                                 "the model: another adapter")
        vals = torch.zeros(size[0], dtype=m.values.dtype)
        try:
            validate_packed(want[prefix + "mask"], vals, want[prefix + "offsets"], m.rank)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{checkpoint_id}: {prefix}mask/offsets: {e}") from None
        if want[prefix + "mask"].shape[0] != m.out_features or recipe["nnz"] != size[0]:
            raise ValueError(f"{checkpoint_id}: {prefix}: the checkpoint's mask and nnz "
                             "disagree with its recipe or with the model's out_features")
        checked[prefix] = (m, vals, recipe["phase"])
    for prefix, (m, vals, phase) in checked.items():
        m.load_packed(want[prefix + "mask"], vals, want[prefix + "offsets"], phase=phase)
    return list(checked)


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
    dev = _comm_device(group)
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

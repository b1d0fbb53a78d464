"""Mask calibration (end of LoRI-D) and the switch to LoRI-S.

LoRI's rule: over all lora_B of all layers and projections, keep the top k = (1 - s) N
magnitudes, i.e. the entries with |B| >= threshold where threshold is the k-th largest |B|
(ties at the threshold are kept, so a group may keep slightly more than k).
"""
from __future__ import annotations

import re
import warnings
from collections import defaultdict

import torch
from torch import nn

from ..nn import DEFAULT_ADAPTER
from .inject import lori_layers, progress_bar

SCOPES = ("global", "layer", "projection", "matrix")
INITS = ("zero", "keep")
_PROGRESS_MIN_LAYERS = 64


def _group_key(name: str, scope: str) -> str:
    if scope == "global":
        return ""
    if scope == "matrix":
        return name
    if scope == "projection":  # e.g. all q_proj across blocks
        return name.rsplit(".", 1)[-1]
    m = re.search(r"^(.*?\.\d+)(\.|$)", name)  # "layer": the first numbered block in the name
    return m.group(1) if m else name


def _kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.kthvalue(x, x.numel() - k + 1).values


def _warn_zero(members) -> None:
    warnings.warn(f"calibrate_masks: B is all zeros in {members[:3]}...: was LoRI-D "
                  "trained? the mask keeps everything there", stacklevel=3)


def _sharded_adapters(model: nn.Module, layers: dict, adapter_name: str, switch: str):
    """(names of the layers whose adapter is FSDP2-sharded, the sharded calibration) — an
    empty set outside torch.distributed. With `switch` (the caller would switch phase), a
    sharded adapter raises ShardedSwitchError before anything is computed or changed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return set(), None
    from ..distributed import fsdp

    ads = {n: l.adapters[adapter_name] for n, l in layers.items()}
    if switch:
        fsdp.check_switchable(model, ads, switch)
    return {n for n, ad in ads.items() if fsdp.is_dtensor(ad.values)}, fsdp.group_masks


@torch.no_grad()
def calibrate_masks(model: nn.Module, sparsity: float = 0.9, scope: str = "global", *,
                    adapter_name: str = DEFAULT_ADAPTER, init: str = "zero", apply: bool = True,
                    progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Masks {layer name: bool (out, rank)} from |B| of `adapter_name` (after LoRI-D).

    scope: "global" (one threshold over all adapted layers, as LoRI does), "layer" (per
    numbered block, e.g. model.layers.3), "projection" (per module name, e.g. all q_proj), or
    "matrix" (per B). With apply=True the adapter switches to LoRI-S: init="zero" re-initialises
    B to zero on the mask (LoRI), init="keep" keeps the LoRI-D values there. A is unchanged.
    progress: tqdm bars (when tqdm is installed), one per pass with one step per adapted layer:
    |B| gathered, then compared with its group's threshold; None shows them from 64 layers.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    layers = {n: l for n, l in lori_layers(model).items() if adapter_name in l.adapters}
    if not layers:
        raise ValueError(f"no LoRI layer has an adapter {adapter_name!r}")
    for n, l in layers.items():
        if l.adapters[adapter_name].phase != "dense":
            raise ValueError(f"{n}: adapter {adapter_name!r} is already sparse (calibrate after "
                             "LoRI-D)")
    sharded, sharded_masks = _sharded_adapters(model, layers, adapter_name,
                                               "calibrate_masks(apply=True)" if apply else "")
    show = len(layers) >= _PROGRESS_MIN_LAYERS if progress is None else progress
    groups: dict[str, list[str]] = defaultdict(list)
    for n in layers:
        groups[_group_key(n, scope)].append(n)
    masks: dict[str, torch.Tensor] = {}
    for members in groups.values():
        if sharded.intersection(members):  # FSDP2: exact threshold over the local shards
            got, all_zero = sharded_masks({n: layers[n].adapters[adapter_name]
                                           for n in members}, sparsity)
            masks.update(got)
            if all_zero:
                _warn_zero(members)
    plain = {k: m for k, m in groups.items() if not sharded.intersection(m)}
    plain_layers = [n for members in plain.values() for n in members]
    # Two passes with a bar each, one step per layer: the global scope is a single group, so
    # a bar per group would show one step for the whole model.
    mags = {n: layers[n].adapters[adapter_name].dense_b().float().abs()
            for n in progress_bar(plain_layers, desc=f"calibrate ({scope}) 1/2: |B|",
                                  disable=not show, unit="layer")}
    thresholds = {}
    for key, members in plain.items():
        flat = torch.cat([mags[n].flatten() for n in members])
        if not flat.any():
            _warn_zero(members)
        k = max(1, int((1.0 - sparsity) * flat.numel()))
        thresholds[key] = _kth_largest(flat, k)
    masks.update({n: mags[n] >= thresholds[_group_key(n, scope)]
                  for n in progress_bar(plain_layers, desc=f"calibrate ({scope}) 2/2: masks",
                                        disable=not show, unit="layer")})
    masks = {n: masks[n] for n in layers}  # the model's layer order, whichever path built them
    if apply:
        to_sparse(model, masks, adapter_name=adapter_name, init=init)
    return masks


@torch.no_grad()
def to_sparse(model: nn.Module, masks: dict[str, torch.Tensor], *,
              adapter_name: str = DEFAULT_ADAPTER, init: str = "zero") -> list[nn.Parameter]:
    """Switch `adapter_name` to LoRI-S on the given masks (see calibrate_masks). The values
    Parameters are replaced; the new ones are returned. Build the optimizer (and scheduler)
    afterwards: one still holding the old Parameters raises at step() instead of training
    nothing. Every mask is checked before any layer changes."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    layers = lori_layers(model)
    missing = [n for n in masks if n not in layers or adapter_name not in layers[n].adapters]
    if missing:
        raise KeyError(f"masks for layers without adapter {adapter_name!r}: {missing[:5]}")
    for n, mask in masks.items():
        ad = layers[n].adapters[adapter_name]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or \
                tuple(mask.shape) != (ad.out_features, ad.rank):
            raise ValueError(f"masks[{n!r}] must be a bool tensor ({ad.out_features}, "
                             f"{ad.rank}), got {getattr(mask, 'dtype', type(mask).__name__)} "
                             f"{tuple(getattr(mask, 'shape', ()))}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # FSDP2 would keep gathering its copy of the old values: refuse, nothing changed.
        _sharded_adapters(model, {n: layers[n] for n in masks}, adapter_name, "to_sparse")
        # A DDP wrapper built before this switch would stop all-reducing: make it raise.
        from ..distributed.ddp import install_stale_ddp_check

        install_stale_ddp_check()
    new = []
    for n, mask in masks.items():
        ad = layers[n].adapters[adapter_name]
        ad.set_pattern(mask, ad.dense_b() if init == "keep" else None, phase="sparse")
        new.append(ad.values)
    return new

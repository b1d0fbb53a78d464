"""Merging adapters into the base weights and combining several adapters (PEFT's cat/linear)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .inject import _set_submodule, lori_layers, progress_bar

COMBINATIONS = ("cat", "linear")


def _fsdp():
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from ..distributed import fsdp

    return fsdp


def _sharded_base(layer) -> bool:
    fsdp = _fsdp()
    return fsdp is not None and (fsdp.is_dtensor(layer.base.weight) or
                                 fsdp.fsdp_managed(layer.base))


def _merge_layer(layer) -> None:
    """layer.merge(), or under FSDP2 (W sharded by rows) the delta added to each rank's own
    rows of W: every rank must call it, in the same layer order."""
    if not _sharded_base(layer):
        layer.merge()
        return
    if layer.merged_terms:
        raise RuntimeError("LoRILinear is already merged")
    _fsdp().apply_terms_sharded(layer, layer.terms, 1.0)
    layer.merged_terms = layer.terms


def _unmerge_layer(layer) -> None:
    if not _sharded_base(layer):
        layer.unmerge()
        return
    _fsdp().apply_terms_sharded(layer, tuple(reversed(layer.merged_terms)), -1.0)
    layer.merged_terms = ()


def merge(model: nn.Module, progress: bool = False) -> nn.Module:
    """Fold every LoRI layer's active combination into its base weight, in place
    (the merge_delta_ op: A generated per tile, never whole). Forward is then base only.

    Under FSDP2 (W sharded by rows as a DTensor) each rank adds the delta to its own rows;
    every rank must call it (B's values are gathered, out x rank each)."""
    for layer in progress_bar(list(lori_layers(model).values()), desc="merge",
                              disable=not progress):
        _merge_layer(layer)
    return model


def merge_and_unload(model: nn.Module, progress: bool = False) -> nn.Module:
    """Merge the active combination into the base weights (layers already merged stay as they
    are) and replace every LoRILinear by its base layer, which keeps the merged weights: the
    adapted model as a plain model (PEFT's merge_and_unload)."""
    for name, layer in progress_bar(list(lori_layers(model).items()), desc="merge",
                                    disable=not progress):
        if not layer.merged:
            _merge_layer(layer)
        _set_submodule(model, name, layer.base)
    return model


def unmerge(model: nn.Module, progress: bool = False) -> nn.Module:
    """Undo merge() (exact up to rounding in the weight's dtype)."""
    for layer in progress_bar(list(lori_layers(model).values()), desc="unmerge",
                              disable=not progress):
        if layer.merged:
            _unmerge_layer(layer)
    return model


def combine_adapters(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], *,
                     combination: str = "cat", merge_into_base: bool = False) -> nn.Module:
    """Make a weighted combination of adapters the active one on every LoRI layer.

    "cat" (PEFT's cat, exact): delta = sum_i w_i s_i B_i A_i.
    "linear" (PEFT's linear; ranks must match): A' = sum_j sign(w_j) sqrt|w_j s_j| A_j,
    B' = sum_i sqrt|w_i s_i| B_i, scale 1, so delta = B' A' has cross terms B_i A_j. Kept as
    the n^2 terms (B_i with A_j's seed), so no A is ever materialised.
    Layers lacking some adapter combine the ones they have. With merge_into_base the result is
    merged into the base weights (unmerge() takes it out again); otherwise it is kept as a
    multi-adapter set evaluated in the forward pass.
    """
    if combination not in COMBINATIONS:
        raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}")
    if len(adapters) != len(weights) or not adapters:
        raise ValueError("need one weight per adapter, and at least one adapter")
    for name, layer in lori_layers(model).items():
        present = [(n, float(w)) for n, w in zip(adapters, weights) if n in layer.adapters]
        if not present:
            layer.set_terms(())
            continue
        s = {n: layer.adapters[n].scale for n, _ in present}
        if combination == "cat":
            terms = [(n, n, w * s[n]) for n, w in present]
        else:
            ranks = {layer.adapters[n].rank for n, _ in present}
            if len(ranks) != 1:
                raise ValueError(f"{name}: 'linear' needs equal ranks, got {sorted(ranks)}")
            cb = {n: math.sqrt(abs(w * s[n])) for n, w in present}
            ca = {n: math.copysign(cb[n], w * s[n]) for n, w in present}
            terms = [(i, j, cb[i] * ca[j]) for i, _ in present for j, _ in present]
        layer.set_terms(terms)
    if merge_into_base:
        merge(model)
    return model

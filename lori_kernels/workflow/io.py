"""Saving and loading a model's adapters: model <-> the compact adapter file
(lori_kernels/workflow/format.py has the file format, its reader and writer)."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import spec
from ..nn import LoRILinear
from .format import FORMAT_VERSION, _bits_from_words, read_adapter, write_adapter_file
from .inject import freeze_non_lori, lori_layers, progress_bar, resolve_adapter, wrap_linear

__all__ = ["FORMAT_VERSION", "load_adapter", "read_adapter", "save_adapter"]


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                 *, dtype: torch.dtype | None = None, progress: bool = False) -> int:
    """Write `adapter_name` (default: the model's only adapter) of every LoRI layer to `path`
    (safetensors). `dtype`: store the values in this dtype (e.g. torch.bfloat16; default: as
    trained). Returns the file's bytes."""
    adapter_name = resolve_adapter(model, adapter_name)

    tensors: dict[str, torch.Tensor] = {}
    layers_meta: dict[str, Any] = {}
    adapter_seeds = set()
    for name, layer in progress_bar(list(lori_layers(model).items()), desc="save",
                                    disable=not progress):
        if adapter_name not in layer.adapters:
            continue
        ad = layer.adapters[adapter_name]
        vals = ad.values.detach()
        if dtype is not None:
            vals = vals.to(dtype)
        tensors[f"{name}.mask"] = _bits_from_words(ad.mask.detach(), ad.rank)
        tensors[f"{name}.values"] = vals.cpu().contiguous()
        tensors[f"{name}.offsets"] = ad.offsets.detach().cpu().contiguous()
        if ad.a is not None:
            tensors[f"{name}.a"] = ad.a.detach().cpu().contiguous()
        layers_meta[name] = {
            "in_features": ad.in_features, "out_features": ad.out_features, "rank": ad.rank,
            "alpha": ad.alpha, "seed": None if ad.seed is None else str(ad.seed),
            "distribution": ad.distribution, "phase": ad.phase, "nnz": ad.nnz,
            "a": "stored" if ad.a is not None else "seed",
        }
        adapter_seeds.add(getattr(ad, "adapter_seed", None))
    if not layers_meta:
        raise ValueError(f"no LoRI layer has an adapter {adapter_name!r}")
    adapter_seed = adapter_seeds.pop() if len(adapter_seeds) == 1 else None
    meta = {
        "adapter_name": adapter_name,
        "adapter_seed": None if adapter_seed is None else str(adapter_seed),
        "seed_rule": "lori_kernels.spec.layer_seed(adapter_seed, layer name)",
        "a_spec_version": spec.A_SPEC_VERSION, "b_spec_version": spec.B_SPEC_VERSION,
        "target_modules": list(layers_meta), "layers": layers_meta,
    }
    return write_adapter_file(path, meta, tensors)


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *,
                 trainable: bool = False, dtype: torch.dtype = torch.float32,
                 activate: bool = True, freeze_base: bool = True, progress: bool = False
                 ) -> nn.Module:
    """Add the adapter stored at `path` to `model` (as `adapter_name`, default: the file's).

    Validates the file (read_adapter) and then every layer against the model (the name exists
    and is an nn.Linear or LoRILinear, in/out features match, the adapter name is free) before
    changing anything. trainable=False loads it frozen (e.g. a safety adapter for continual
    learning). Values are held in `dtype`. freeze_base: as in inject."""
    meta, tensors = read_adapter(path)
    adapter_name = adapter_name or meta["adapter_name"]
    layers = meta["layers"]
    for name, lm in layers.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{os.fspath(path)}: layer {name!r} is not in the model") from None
        base = mod.base if isinstance(mod, LoRILinear) else mod
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{name}: expected an nn.Linear, found {type(base).__name__}")
        if (base.in_features, base.out_features) != (lm["in_features"], lm["out_features"]):
            raise ValueError(f"{name}: the file's adapter is for ({lm['out_features']}, "
                             f"{lm['in_features']}) but the model's layer is "
                             f"({base.out_features}, {base.in_features})")
        if isinstance(mod, LoRILinear) and adapter_name in mod.adapters:
            raise ValueError(f"{name}: adapter {adapter_name!r} already exists")
    adapter_seed = meta.get("adapter_seed")
    for name, lm in progress_bar(list(layers.items()), desc="load", disable=not progress):
        layer = wrap_linear(model, name)
        stored_a = tensors.get(f"{name}.a")
        ad = layer.add_adapter(
            adapter_name, rank=lm["rank"], alpha=float(lm["alpha"]),
            seed=None if lm["a"] == "stored" else int(lm["seed"]),
            distribution=lm["distribution"], dtype=dtype,
            a=None if stored_a is None else stored_a.float(), activate=activate)
        ad.adapter_seed = None if adapter_seed is None else int(adapter_seed)
        ad.load_packed(tensors[f"{name}.mask"], tensors[f"{name}.values"],
                       tensors[f"{name}.offsets"], phase=lm["phase"])
        ad.values.requires_grad_(trainable)
    if freeze_base:
        freeze_non_lori(model)
    return model

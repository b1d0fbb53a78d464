"""Saving and loading a model's adapters: model <-> the compact adapter file
(lori_kernels/workflow/format.py has the file format, its reader and writer)."""
from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from .. import spec
from ..nn import LoRILinear
from ..nn.linear import check_adapter_name, check_alpha, features, is_adaptable
from .format import FORMAT_VERSION, _bits_from_words, read_adapter, write_adapter_file
from .inject import (canonical_name, freeze_non_lori, lori_layers, progress_bar, resolve_adapter,
                     wrap_linear)

__all__ = ["FORMAT_VERSION", "load_adapter", "read_adapter", "save_adapter"]

WEIGHTS_NAME = "adapter_model.safetensors"
_LAYER_NAME = re.compile(r"[^.]+(\.[^.]+)*")


def adapter_file(path: str | os.PathLike) -> str:
    """`path` itself, or `path`/adapter_model.safetensors when `path` is a directory: an
    existing one, one ending with a path separator, or a path that does not exist and has no
    file extension (e.g. "out/task")."""
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith((os.sep, "/")) or (
            not os.path.exists(path) and not os.path.splitext(path)[1]):
        return os.path.join(path, WEIGHTS_NAME)
    return path


def _seed_field(value, field: str, where: str) -> int | None:
    """A seed from the file's metadata: a decimal string (64-bit) or an int; never a float, a
    bool or anything int() would truncate."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (
            isinstance(value, str) and not value.isdigit()):
        raise ValueError(f"{where}: {field} must be an integer (a decimal string) in "
                         f"[0, 2**64), got {value!r}")
    seed = int(value)
    try:
        spec.check_seed(seed, field)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    return seed


def check_adapter_meta(meta: dict, path) -> dict[str, dict]:
    """Every field of a read adapter file that load_adapter uses, checked before any change:
    {layer name: {alpha, seed}} parsed. ValueError naming the field."""
    where = os.fspath(path)
    check = {}
    name = meta.get("adapter_name")
    try:
        check_adapter_name(name, "adapter_name in the file")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    meta_seed = _seed_field(meta.get("adapter_seed"), "adapter_seed", where)
    for lname, lm in meta["layers"].items():
        if not isinstance(lname, str) or not _LAYER_NAME.fullmatch(lname):
            raise ValueError(f"{where}: layer name {lname!r} is not a dotted module path")
        try:
            alpha = check_alpha(lm["alpha"], f"{lname}: alpha")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        seed = None if lm["a"] == "stored" else _seed_field(lm["seed"], f"{lname}: seed", where)
        if lm["a"] == "seed" and seed is None:
            raise ValueError(f"{where}: {lname}: seed is missing for a seeded A")
        check[lname] = {"alpha": alpha, "seed": seed}
    check[""] = {"adapter_seed": meta_seed}
    return check


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                 *, dtype: torch.dtype | None = None, progress: bool = False) -> int:
    """Write `adapter_name` (default: the model's only adapter) of every LoRI layer to `path`
    (safetensors). `dtype`: store the values in this dtype (e.g. torch.bfloat16; default: as
    trained). Returns the file's bytes.

    Under FSDP2 (sharded values) every rank must call it: the values are gathered, rank 0
    writes, every rank returns the same byte count, and an error on rank 0 is raised on every
    rank."""
    adapter_name = resolve_adapter(model, adapter_name)
    path = adapter_file(path)
    fsdp = _sharded(model)

    tensors: dict[str, torch.Tensor] = {}
    layers_meta: dict[str, Any] = {}
    adapter_seeds = set()
    for name, layer in progress_bar(list(lori_layers(model).items()), desc="save",
                                    disable=not progress):
        if adapter_name not in layer.adapters:
            continue
        ad = layer.adapters[adapter_name]
        name = canonical_name(model, name)  # the plain model's name, whatever wraps it
        # FSDP2: the whole values (a collective; every rank walks the layers in one order)
        vals = fsdp.full(ad.values.detach()) if fsdp else ad.values.detach()
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
        adapter_seeds.add(ad.adapter_seed)
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

    def write():
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return write_adapter_file(path, meta, tensors)

    if fsdp:  # one writer; every rank returns its bytes or raises its error
        return fsdp.on_rank0(write, f"save_adapter({path!r})")
    return write()


def _sharded(model: nn.Module):
    """lori_kernels.distributed.fsdp when `model` holds FSDP2-sharded LoRI layers, else None."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from ..distributed import fsdp

    return fsdp if fsdp.model_sharded(model) else None


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, *,
                 trainable: bool = False, dtype: torch.dtype = torch.float32,
                 activate: bool = True, freeze_base: bool = True, progress: bool = False
                 ) -> nn.Module:
    """Add the adapter stored at `path` (a file, or a directory holding
    adapter_model.safetensors) to `model` (as `adapter_name`, default: the file's).

    All or nothing: the file (read_adapter), every metadata field used here (adapter name,
    seeds, alphas, layer names) and every layer against the model (the name exists and is an
    nn.Linear, Conv1D or LoRILinear, in/out features match, the adapter name is free) are
    checked before the model changes; any failure is a ValueError and leaves the model as it
    was. trainable=False loads it frozen (e.g. a safety adapter for continual learning). Values
    are held in `dtype`. activate: add it to the active combination. freeze_base: as in
    inject."""
    path = adapter_file(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such adapter file")
    meta, tensors = read_adapter(path)
    parsed = check_adapter_meta(meta, path)
    if adapter_name is None:
        adapter_name = meta["adapter_name"]
    check_adapter_name(adapter_name)
    # The file names layers as in the plain model; a wrapped model (DDP, torch.compile, ...)
    # holds them under wrapper children.
    in_model = {canonical_name(model, n): n for n, _ in model.named_modules()}
    layers = {}
    for cname, lm in meta["layers"].items():
        if cname not in in_model:
            raise ValueError(f"{path}: layer {cname!r} is not in the model")
        layers[in_model[cname]] = lm
    file_name = {in_model[c]: c for c in meta["layers"]}
    parsed = {**{in_model[c]: v for c, v in parsed.items() if c}, "": parsed[""]}
    for name, lm in layers.items():
        mod = model.get_submodule(name)
        if not (is_adaptable(mod) or isinstance(mod, LoRILinear)):
            raise ValueError(f"{name}: expected an nn.Linear or Conv1D, found "
                             f"{type(mod).__name__}")
        in_f, out_f = features(mod)
        if (in_f, out_f) != (lm["in_features"], lm["out_features"]):
            raise ValueError(f"{name}: the file's adapter is for ({lm['out_features']}, "
                             f"{lm['in_features']}) but the model's layer is "
                             f"({out_f}, {in_f})")
        if isinstance(mod, LoRILinear) and adapter_name in mod.adapters:
            raise ValueError(f"{name}: adapter {adapter_name!r} already exists")
    adapter_seed = parsed[""]["adapter_seed"]
    for name, lm in progress_bar(list(layers.items()), desc="load", disable=not progress):
        layer = wrap_linear(model, name)
        fname = file_name[name]
        stored_a = tensors.get(f"{fname}.a")
        ad = layer.add_adapter(
            adapter_name, rank=lm["rank"], alpha=parsed[name]["alpha"],
            seed=parsed[name]["seed"], distribution=lm["distribution"], dtype=dtype,
            a=None if stored_a is None else stored_a.float(), activate=activate)
        ad.adapter_seed = adapter_seed
        ad.load_packed(tensors[f"{fname}.mask"], tensors[f"{fname}.values"],
                       tensors[f"{fname}.offsets"], phase=lm["phase"])
        ad.values.requires_grad_(trainable)
    if freeze_base:
        freeze_non_lori(model)
    return model

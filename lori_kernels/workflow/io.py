"""The compact adapter file: safetensors with B's bitmask form and JSON metadata; no A.

Tensors, per adapted layer `<name>`: `<name>.mask` (uint8, the bool (out, rank) mask row-major,
8 entries per byte, least significant bit first, zero padding: 1 bit per entry whatever the
rank), `<name>.values` (packed values, docs/spec_b.md order), `<name>.offsets` (int32 chunk
offsets, as in PackedB; a check on the mask), and `<name>.a` only for an imported adapter whose
A cannot be regenerated. safetensors metadata: "format" = FORMAT,
"format_version", and "lori" = JSON {adapter_name, adapter_seed, a_spec_version,
b_spec_version, target_modules, layers: {name: {in_features, out_features, rank, alpha, seed
(decimal string, 64-bit), distribution, phase, nnz, a: "seed"|"stored"}}}.
Loading reads only that (safetensors never unpickles) and validates all of it against the
model before touching the model.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import spec
from ..nn import PHASES, LoRILinear
from ..packing import VALUE_DTYPES, pack_mask, unpack_mask, validate_packed
from .inject import freeze_non_lori, lori_layers, progress_bar, resolve_adapter, wrap_linear

FORMAT = "lori_kernels.adapter"
FORMAT_VERSION = 1
_LAYER_KEYS = {"in_features", "out_features", "rank", "alpha", "seed", "distribution", "phase",
               "nnz", "a"}


def _bits_from_words(words: torch.Tensor, rank: int) -> torch.Tensor:
    bools = unpack_mask(words.cpu(), rank).numpy()
    return torch.from_numpy(np.packbits(bools.reshape(-1), bitorder="little"))


def _words_from_bits(bits: torch.Tensor, out_features: int, rank: int) -> torch.Tensor:
    n = out_features * rank
    if bits.dtype != torch.uint8 or tuple(bits.shape) != ((n + 7) // 8,):
        raise ValueError(f"mask must be uint8 of shape ({(n + 7) // 8},), got {bits.dtype} "
                         f"{tuple(bits.shape)}")
    flat = np.unpackbits(bits.numpy(), bitorder="little")
    if flat[n:].any():
        raise ValueError("mask has padding bits set")
    return pack_mask(torch.from_numpy(flat[:n].reshape(out_features, rank).astype(bool)))


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                 *, dtype: torch.dtype | None = None, progress: bool = False) -> int:
    """Write `adapter_name` (default: the model's only adapter) of every LoRI layer to `path`
    (safetensors). `dtype`: store the values in this dtype (e.g. torch.bfloat16; default: as
    trained). Returns the file's bytes."""
    adapter_name = resolve_adapter(model, adapter_name)
    from safetensors.torch import save_file

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
    save_file(tensors, os.fspath(path), metadata={
        "format": FORMAT, "format_version": str(FORMAT_VERSION),
        "lori": json.dumps(meta, separators=(",", ":"))})
    return os.path.getsize(path)


def _fail(path, msg: str):
    raise ValueError(f"{os.fspath(path)}: not a valid LoRI adapter file: {msg}")


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of an adapter file (masks returned as int32 words), checked on its
    own: format, version, every layer's metadata, each B with packing.validate_packed, no stray
    tensors. No model needed."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != FORMAT:
            _fail(path, f"metadata 'format' is {header.get('format')!r}, expected {FORMAT!r}")
        try:
            version = int(header.get("format_version", ""))
        except ValueError:
            _fail(path, "metadata 'format_version' is missing or not an integer")
        if version > FORMAT_VERSION or version < 1:
            _fail(path, f"format_version {version} is not supported (this reader: "
                        f"{FORMAT_VERSION})")
        try:
            meta = json.loads(header["lori"])
        except (KeyError, json.JSONDecodeError) as e:
            _fail(path, f"metadata 'lori' is missing or not JSON ({e})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("a_spec_version") != spec.A_SPEC_VERSION or \
            meta.get("b_spec_version") != spec.B_SPEC_VERSION:
        _fail(path, f"A/B spec versions {meta.get('a_spec_version')}/"
                    f"{meta.get('b_spec_version')} differ from this build's "
                    f"{spec.A_SPEC_VERSION}/{spec.B_SPEC_VERSION}")
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        _fail(path, "no layers in metadata")
    expected = set()
    for name, lm in layers.items():
        if not isinstance(lm, dict) or set(lm) != _LAYER_KEYS:
            _fail(path, f"{name}: layer metadata keys must be {sorted(_LAYER_KEYS)}")
        for key in ("in_features", "out_features", "rank", "nnz"):
            if not isinstance(lm[key], int) or isinstance(lm[key], bool) or lm[key] < 0:
                _fail(path, f"{name}: {key} must be a non-negative int")
        if lm["phase"] not in PHASES or lm["a"] not in ("seed", "stored"):
            _fail(path, f"{name}: bad phase/a {lm['phase']!r}/{lm['a']!r}")
        try:
            spec.check_distribution(lm["distribution"])
            if lm["a"] == "seed":
                spec.check_seed(int(lm["seed"]))
            float(lm["alpha"])
        except (TypeError, ValueError) as e:
            _fail(path, f"{name}: {e}")
        keys = {f"{name}.mask", f"{name}.values", f"{name}.offsets"}
        if lm["a"] == "stored":
            keys.add(f"{name}.a")
        missing = keys - tensors.keys()
        if missing:
            _fail(path, f"{name}: missing tensors {sorted(missing)}")
        expected |= keys
        if not 1 <= lm["rank"] <= spec.MAX_RANK or lm["out_features"] < 1:
            _fail(path, f"{name}: rank/out_features out of range")
        values, offsets = tensors[f"{name}.values"], tensors[f"{name}.offsets"]
        try:
            mask = _words_from_bits(tensors[f"{name}.mask"], lm["out_features"], lm["rank"])
            validate_packed(mask, values, offsets, lm["rank"])
        except (ValueError, TypeError) as e:
            _fail(path, f"{name}: {e}")
        tensors[f"{name}.mask"] = mask  # the kernels' int32 words from here on
        if values.numel() != lm["nnz"]:
            _fail(path, f"{name}: tensors disagree with out_features/nnz in metadata")
        if lm["phase"] == "dense" and lm["nnz"] != lm["out_features"] * lm["rank"]:
            _fail(path, f"{name}: a dense-phase B must have out_features*rank values")
        if lm["a"] == "stored":
            a = tensors[f"{name}.a"]
            if a.dtype not in VALUE_DTYPES or tuple(a.shape) != (lm["rank"], lm["in_features"]):
                _fail(path, f"{name}.a: expected float ({lm['rank']}, {lm['in_features']}), got "
                            f"{a.dtype} {tuple(a.shape)}")
    stray = tensors.keys() - expected
    if stray:
        _fail(path, f"tensors not described by the metadata: {sorted(stray)[:5]}")
    return meta, tensors


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

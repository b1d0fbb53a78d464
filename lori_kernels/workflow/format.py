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

from .. import spec
from ..nn import PHASES
from ..packing import VALUE_DTYPES, pack_mask, unpack_mask, validate_packed

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


def write_adapter_file(path: str | os.PathLike, meta: dict[str, Any],
                       tensors: dict[str, torch.Tensor]) -> int:
    """Write the file: `tensors` (masks already in their uint8 file form) and the JSON `meta`
    (module docstring). Returns the file's bytes."""
    from safetensors.torch import save_file

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

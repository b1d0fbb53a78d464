"""The compact adapter file: safetensors with B's bitmask form and JSON metadata; no A.

Tensors, per adapted layer `<name>`: `<name>.mask` (uint8, the bool (out, rank) mask row-major,
8 entries per byte, least significant bit first, zero padding: 1 bit per entry whatever the
rank), `<name>.values` (packed values, docs/spec_b.md order), `<name>.offsets` (int32 chunk
offsets, as in PackedB; a check on the mask), and `<name>.a` only for an imported adapter whose
A cannot be regenerated. safetensors metadata: "format" = FORMAT,
"format_version", "lori" = JSON {adapter_name, adapter_seed, a_spec_version,
b_spec_version, target_modules, layers: {name: {in_features, out_features, rank, alpha, seed
(decimal string, 64-bit), distribution, phase, nnz, a: "seed"|"stored"}}}, and (version 2)
"digests" = JSON {"algorithm": "sha256-128", "metadata": {"lori": hex}, "tensors": {name: hex}}.

Integrity (version 2): each tensor's digest covers its dtype, shape and bytes, and the "lori"
JSON has one too, so a flipped value, mask or offsets byte (or an edited field) is found on
load and named. PackedB's structure checks cannot see every such flip: two mask bits moved
within one 64-row chunk keep every chunk total. Version 1 files (no digests) are still read,
with the structure and type checks only; a version-1 file that carries digests is rejected
(a downgraded version field must not switch the digests off).

Loading reads only that (safetensors never unpickles) and checks all of it on its own before
anything is handed to a model. Every load failure raises AdapterFileError (a ValueError naming
the file and the field, the underlying error chained as __cause__); a missing file raises
AdapterFileNotFoundError, which is also a FileNotFoundError.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import numpy as np
import torch

from .. import spec
from ..nn import PHASES
from ..packing import VALUE_DTYPES, pack_mask, unpack_mask, validate_packed

FORMAT = "lori_kernels.adapter"
FORMAT_VERSION = 2
# sha256 truncated to 128 bits: plenty against corruption (the threat here; the file is not
# signed), at half the metadata bytes per tensor of a full digest.
DIGEST = "sha256-128"
_LAYER_KEYS = {"in_features", "out_features", "rank", "alpha", "seed", "distribution", "phase",
               "nnz", "a"}
_TOP_KEYS = ("adapter_name", "adapter_seed", "a_spec_version", "b_spec_version",
             "target_modules", "layers")
_MAX_IN = (1 << 31) - 1


class AdapterFileError(ValueError):
    """An adapter file that cannot be loaded (corrupt, truncated, edited, not an adapter)."""


class AdapterFileNotFoundError(AdapterFileError, FileNotFoundError):
    """The path does not exist (an AdapterFileError and a FileNotFoundError)."""


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 over a tensor's dtype, shape and bytes (C order), its first 128 bits as hex."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def _text_digest(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:32]


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
    """Write the file: `tensors` (masks already in their uint8 file form), the JSON `meta`
    (module docstring) and the digests of both. Returns the file's bytes."""
    from safetensors.torch import save_file

    lori = json.dumps(meta, separators=(",", ":"), allow_nan=False)
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    digests = {"algorithm": DIGEST, "metadata": {"lori": _text_digest(lori)},
               "tensors": {k: tensor_digest(t) for k, t in sorted(tensors.items())}}
    save_file(tensors, os.fspath(path), metadata={
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "lori": lori,
        "digests": json.dumps(digests, separators=(",", ":"))})
    return os.path.getsize(path)


def _fail(path, msg: str):
    raise AdapterFileError(f"{os.fspath(path)}: not a valid LoRI adapter file: {msg}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _seed_string(v, what: str) -> int:
    """A seed stored as its canonical decimal string (what str(int) writes), in [0, 2**64)."""
    if not isinstance(v, str) or not v.isascii() or not v.isdigit() or str(int(v)) != v:
        raise ValueError(f"{what} must be a decimal string (no sign, spaces or leading zeros), "
                         f"got {v!r}")
    seed = int(v)
    if seed >= 1 << 64:
        raise ValueError(f"{what} must be in [0, 2**64), got {v}")
    return seed


def _check_digests(path, header: dict, tensors: dict[str, torch.Tensor]) -> None:
    try:
        d = json.loads(header["digests"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{os.fspath(path)}: not a valid LoRI adapter file: metadata "
                               f"'digests' is missing or not JSON ({e})") from e
    if not isinstance(d, dict) or set(d) != {"algorithm", "metadata", "tensors"} \
            or d["algorithm"] != DIGEST or not isinstance(d["metadata"], dict) \
            or set(d["metadata"]) != {"lori"} or not isinstance(d["tensors"], dict):
        _fail(path, f"metadata 'digests' must be {{'algorithm': {DIGEST!r}, 'metadata': "
                    "{'lori': hex}, 'tensors': {name: hex}}")
    if d["metadata"]["lori"] != _text_digest(header["lori"]):
        _fail(path, "metadata 'lori' does not match its sha256 digest (the file is corrupt or "
                    "was edited)")
    if set(d["tensors"]) != set(tensors):
        diff = sorted(set(d["tensors"]) ^ set(tensors))
        _fail(path, f"the tensors and their digests differ: {diff[:5]}")
    for k, t in tensors.items():
        if d["tensors"][k] != tensor_digest(t):
            _fail(path, f"tensor {k!r} does not match its sha256 digest (the file is corrupt "
                        "or was edited)")


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of an adapter file (masks returned as int32 words), checked on its
    own: format, version, digests (version 2), every field's type and range, each B with
    packing.validate_packed, no stray tensors. No model needed.

    Raises AdapterFileError (a ValueError naming the file and the field, cause chained) for
    every failure, AdapterFileNotFoundError (also a FileNotFoundError) for a missing path."""
    p = os.fspath(path)
    try:
        return _read(p)
    except AdapterFileError:
        raise
    except FileNotFoundError as e:
        raise AdapterFileNotFoundError(f"{p}: no such adapter file") from e
    except Exception as e:  # safetensors' SafetensorError, OSError (a directory, a bad read)...
        raise AdapterFileError(f"{p}: not a valid LoRI adapter file: cannot be read "
                               f"({type(e).__name__}: {e})") from e


def _read(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != FORMAT:
            _fail(path, f"metadata 'format' is {header.get('format')!r}, expected {FORMAT!r}")
        v = header.get("format_version")
        if not isinstance(v, str) or not v.isascii() or not v.isdigit() or str(int(v)) != v:
            _fail(path, f"metadata 'format_version' is missing or not an integer: {v!r}")
        version = int(v)
        if version > FORMAT_VERSION or version < 1:
            _fail(path, f"format_version {version} is not supported (this reader: 1 to "
                        f"{FORMAT_VERSION})")
        if version == 1 and "digests" in header:
            _fail(path, "format_version 1 but the file carries digests (an edited version "
                        "field?)")
        if not isinstance(header.get("lori"), str):
            _fail(path, "metadata 'lori' is missing")
        tensors = {}
        for k in f.keys():
            try:
                tensors[k] = f.get_tensor(k)
            except Exception as e:
                raise AdapterFileError(f"{path}: not a valid LoRI adapter file: tensor {k!r} "
                                       f"cannot be read ({type(e).__name__}: {e})") from e
    if version >= 2:
        _check_digests(path, header, tensors)
    try:
        meta = json.loads(header["lori"])
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path}: not a valid LoRI adapter file: metadata 'lori' is not "
                               f"JSON ({e})") from e
    _check_meta(path, meta)
    expected = set()
    for name, lm in meta["layers"].items():
        keys = {f"{name}.mask", f"{name}.values", f"{name}.offsets"}
        if lm["a"] == "stored":
            keys.add(f"{name}.a")
        missing = keys - tensors.keys()
        if missing:
            _fail(path, f"{name}: missing tensors {sorted(missing)}")
        expected |= keys
        values, offsets = tensors[f"{name}.values"], tensors[f"{name}.offsets"]
        try:
            mask = _words_from_bits(tensors[f"{name}.mask"], lm["out_features"], lm["rank"])
            validate_packed(mask, values, offsets, lm["rank"])
        except (ValueError, TypeError) as e:
            raise AdapterFileError(f"{path}: not a valid LoRI adapter file: {name}: {e}") from e
        tensors[f"{name}.mask"] = mask  # the kernels' int32 words from here on
        if values.numel() != lm["nnz"]:
            _fail(path, f"{name}.values: {values.numel()} entries but the metadata's nnz is "
                        f"{lm['nnz']}")
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


def _check_meta(path: str, meta) -> None:
    """Types and ranges of every metadata field (the file's own consistency, not the model's)."""
    if not isinstance(meta, dict):
        _fail(path, "metadata 'lori' must be a JSON object")
    missing = [k for k in _TOP_KEYS if k not in meta]
    if missing:
        _fail(path, f"metadata 'lori' lacks {missing}")
    if not isinstance(meta["adapter_name"], str) or not meta["adapter_name"]:
        _fail(path, f"adapter_name must be a non-empty string, got {meta['adapter_name']!r}")
    try:
        if meta["adapter_seed"] is not None:
            _seed_string(meta["adapter_seed"], "adapter_seed")
    except ValueError as e:
        _fail(path, str(e))
    for key, want in (("a_spec_version", spec.A_SPEC_VERSION),
                      ("b_spec_version", spec.B_SPEC_VERSION)):
        if not _is_int(meta[key]) or meta[key] != want:
            _fail(path, f"{key} is {meta[key]!r}, this build reads {want}")
    layers = meta["layers"]
    if not isinstance(layers, dict) or not layers:
        _fail(path, "no layers in metadata")
    tm = meta["target_modules"]
    if not isinstance(tm, list) or sorted(map(str, tm)) != sorted(layers) or \
            not all(isinstance(t, str) for t in tm):
        _fail(path, "target_modules must list the layers' names")
    for name, lm in layers.items():
        if not name:
            _fail(path, "a layer has an empty name")
        if not isinstance(lm, dict) or set(lm) != _LAYER_KEYS:
            _fail(path, f"{name}: layer metadata keys must be {sorted(_LAYER_KEYS)}")
        for key, lo, hi in (("in_features", 1, _MAX_IN), ("out_features", 1, _MAX_IN),
                            ("rank", 1, spec.MAX_RANK)):
            if not _is_int(lm[key]) or not lo <= lm[key] <= hi:
                _fail(path, f"{name}.{key} must be an int in [{lo}, {hi}], got {lm[key]!r}")
        most = lm["out_features"] * lm["rank"]
        if not _is_int(lm["nnz"]) or not 0 <= lm["nnz"] <= most:
            _fail(path, f"{name}.nnz must be an int in [0, out_features*rank = {most}], got "
                        f"{lm['nnz']!r}")
        alpha = lm["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or \
                not math.isfinite(alpha):
            _fail(path, f"{name}.alpha must be a finite number, got {alpha!r}")
        if lm["phase"] not in PHASES:
            _fail(path, f"{name}.phase must be one of {PHASES}, got {lm['phase']!r}")
        if lm["a"] not in ("seed", "stored"):
            _fail(path, f"{name}.a must be 'seed' or 'stored', got {lm['a']!r}")
        if not isinstance(lm["distribution"], str) or lm["distribution"] not in \
                spec.DISTRIBUTIONS:
            _fail(path, f"{name}.distribution must be one of {sorted(spec.DISTRIBUTIONS)}, got "
                        f"{lm['distribution']!r}")
        try:
            if lm["a"] == "seed" or lm["seed"] is not None:
                _seed_string(lm["seed"], f"{name}.seed")
        except ValueError as e:
            _fail(path, str(e))

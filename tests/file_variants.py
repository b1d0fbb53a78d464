"""Corrupt variants of an adapter file, and the oracle each must pass: the loader rejects it
with a ValueError, or returns exactly what was saved. Shared by tests/test_fuzz_files.py (a
bounded sample) and tests/fuzz_driver.py (every byte and bit)."""
from __future__ import annotations

import json
import os
import random
import struct

import torch
from safetensors.torch import save_file

from lori_kernels import reference
from lori_kernels.testing import random_packed
from lori_kernels.workflow import format as F

OUTCOMES = ("rejected", "identical", "wrong", "bad_exception")


def sample_file(path, *, seed: int = 0) -> tuple[dict, dict]:
    """A small two-layer adapter (one with a stored A, 70 rows = two 64-row chunks, rank 5;
    fp32 and bf16 values) written by write_adapter_file. Returns (meta, file tensors)."""
    g = torch.Generator().manual_seed(seed)
    layers, tensors = {}, {}
    for name, out, rank, dt, a_stored in (("m.q", 70, 5, torch.float32, False),
                                          ("m.v", 9, 3, torch.bfloat16, True)):
        p = random_packed(out, rank, 0.4, dtype=dt, generator=g)
        tensors[f"{name}.mask"] = F._bits_from_words(p.mask, rank)
        tensors[f"{name}.values"] = p.values
        tensors[f"{name}.offsets"] = p.offsets
        if a_stored:
            tensors[f"{name}.a"] = reference.random_a(5, rank, 12)
        layers[name] = {"in_features": 12, "out_features": out, "rank": rank, "alpha": 8.0,
                        "seed": None if a_stored else "12345678901234567890",
                        "distribution": "rademacher", "phase": "sparse", "nnz": p.nnz,
                        "a": "stored" if a_stored else "seed"}
    meta = {"adapter_name": "t", "adapter_seed": "3", "seed_rule": "r",
            "a_spec_version": reference.spec.A_SPEC_VERSION,
            "b_spec_version": reference.spec.B_SPEC_VERSION,
            "target_modules": list(layers), "layers": layers}
    F.write_adapter_file(path, meta, tensors)
    return meta, tensors


def snapshot(loaded) -> tuple:
    """What a load returned, comparable bit for bit."""
    meta, tensors = loaded
    return (json.dumps(meta, sort_keys=True),
            {k: (t.dtype, tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).tolist()
                 if t.numel() else []) for k, t in tensors.items()})


def outcome(path, ref) -> tuple[str, str]:
    """(one of OUTCOMES, detail) of loading `path` against the snapshot `ref` of the original."""
    try:
        got = F.read_adapter(path)
    except ValueError as e:
        return "rejected", str(e)[:200]
    except Exception as e:  # noqa: BLE001 - any other type breaks the one-exception rule
        return "bad_exception", f"{type(e).__name__}: {e}"[:200]
    return ("identical", "") if snapshot(got) == ref else ("wrong", "loaded other data")


def header_span(data: bytes) -> tuple[int, dict]:
    """(end of the JSON header, the parsed header) of a safetensors byte string."""
    n = struct.unpack("<Q", data[:8])[0]
    return 8 + n, json.loads(data[8:8 + n])


def _with_header(data: bytes, header: dict) -> bytes:
    end, _ = header_span(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data[end:]


def byte_variants(data: bytes, *, every: int = 1, bits=range(8), rng: random.Random | None = None):
    """Single-bit flips: every `every`-th byte (all bytes of the 8-byte length prefix), each
    bit in `bits` (or one random bit per byte with rng). Labels name the region."""
    end, _ = header_span(data)
    for i in range(len(data)):
        if i >= 8 and i % every:
            continue
        region = "length" if i < 8 else "header" if i < end else "data"
        for b in ([rng.randrange(8)] if rng else bits):
            v = bytearray(data)
            v[i] ^= 1 << b
            yield f"flip {region} byte {i} bit {b}", bytes(v)


def truncations(data: bytes, *, every: int = 0):
    end, hdr = header_span(data)
    cuts = {0, 1, 7, 8, 9, end - 1, end, end + 1, len(data) - 1}
    for k, v in hdr.items():
        if k != "__metadata__":
            cuts.update({8 + end - 8 + v["data_offsets"][0], end + v["data_offsets"][1] - 1})
    if every:
        cuts.update(range(0, len(data), every))
    for c in sorted(x for x in cuts if 0 <= x < len(data)):
        yield f"truncate to {c}", data[:c]
    yield "append 1 byte", data + b"\0"
    yield "append 8 bytes", data + b"\0" * 8


def header_edits(data: bytes):
    """Edits of the safetensors header: dtypes, shapes, offsets, names, the length prefix."""
    end, hdr = header_span(data)
    names = [k for k in hdr if k != "__metadata__"]
    for k in names:
        info = hdr[k]
        for dt in ("U8", "I8", "I32", "F32", "BF16", "F16", "I64", "F64", "BOOL"):
            if dt != info["dtype"]:
                h = json.loads(json.dumps(hdr))
                h[k]["dtype"] = dt
                yield f"{k} dtype -> {dt}", _with_header(data, h)
        for shape in ([], [0], [1], info["shape"] + [1], [max(1, info["shape"][0] - 1)]):
            h = json.loads(json.dumps(hdr))
            h[k]["shape"] = shape
            yield f"{k} shape -> {shape}", _with_header(data, h)
        a, b = info["data_offsets"]
        for off in ([a + 1, b], [a, b - 1], [a - 1, b - 1] if a else [a, b + 1], [b, a]):
            h = json.loads(json.dumps(hdr))
            h[k]["data_offsets"] = off
            yield f"{k} offsets -> {off}", _with_header(data, h)
        h = json.loads(json.dumps(hdr))
        h[k + "x"] = h.pop(k)
        yield f"rename {k}", _with_header(data, h)
        h = json.loads(json.dumps(hdr))
        del h[k]
        yield f"drop {k} (hole in the data)", _with_header(data, h)
    for i, j in ((0, 1), (1, 2), (0, len(names) - 1)):
        h = json.loads(json.dumps(hdr))
        h[names[i]], h[names[j]] = hdr[names[j]], hdr[names[i]]
        yield f"swap {names[i]} <-> {names[j]}", _with_header(data, h)
    n = struct.unpack("<Q", data[:8])[0]
    for m in (0, n - 8, n + 8, len(data), 1 << 40, (1 << 64) - 1):
        yield f"header length -> {m}", struct.pack("<Q", m) + data[8:]
    yield "header not JSON", data[:8] + b"{" + b" " * (n - 1) + data[end:]


def _resave(path, md: dict, tensors: dict):
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(path), metadata=md)


def _read_raw(path) -> tuple[dict, dict]:
    from safetensors import safe_open
    with safe_open(os.fspath(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _layer_edits():
    """(label, edit of one layer's metadata dict): each makes the file invalid."""
    def setter(k, v):
        return lambda lm: lm.__setitem__(k, v)
    bad = {
        "alpha": ["8", float("nan"), float("inf"), True, None, [8]],
        "seed": ["-1", "1e3", " 3", "03", "+3", str(1 << 64), 3, None, "", "3.0", "٣"],
        "rank": [0, 257, 5.0, True, "5", 4, 6, -5],
        "in_features": [0, -1, 1 << 31, 12.0, "12", None],
        "out_features": [0, 71, 140, 70.0, None],
        "nnz": [-1, 10 ** 6, "1", None],
        "distribution": ["normal", 1, None, "Rademacher"],
        "phase": ["x", None, 0],
        "a": ["x", None, "stored"],
    }
    for k, vs in bad.items():
        for v in vs:
            yield f"layer {k} = {v!r}", setter(k, v)
    yield "layer extra key", lambda lm: lm.__setitem__("extra", 1)
    yield "layer missing key", lambda lm: lm.pop("alpha")
    yield "dense phase with a sparse B", setter("phase", "dense")


def _meta_edits(first: str):
    def top(k, v):
        return lambda m: m.__setitem__(k, v)
    for k, vs in {"adapter_name": ["", 1, None], "adapter_seed": ["x", "-3", 3, "3 "],
                  "a_spec_version": [True, "1", 99, None], "b_spec_version": [99, 1.5],
                  "target_modules": [[], ["zz"], "m.q", None], "layers": [{}, [], None]}.items():
        for v in vs:
            yield f"{k} = {v!r}", top(k, v)
    for k in ("adapter_name", "layers", "a_spec_version", "target_modules"):
        yield f"drop {k}", lambda m, k=k: m.pop(k)
    for label, fn in _layer_edits():
        yield label, lambda m, fn=fn: fn(m["layers"][first])
    yield "layer metadata not a dict", lambda m: m["layers"].__setitem__(first, [1])


def _tensor_edits(first: str, stored: str):
    """(label, edit of the tensors dict) that each make the file invalid."""
    def tset(k, fn):
        return lambda t: t.__setitem__(k, fn(t[k]))
    yield "offsets zeroed", tset(f"{first}.offsets", torch.zeros_like)
    yield "offsets[0] = 1", tset(f"{first}.offsets", lambda o: torch.cat([o[:1] + 1, o[1:]]))
    yield "offsets decreasing", tset(f"{first}.offsets", lambda o: o.flip(0))
    yield "offsets int64", tset(f"{first}.offsets", lambda o: o.long())
    yield "offsets too short", tset(f"{first}.offsets", lambda o: o[:-1])
    yield "values one short", tset(f"{first}.values", lambda v: v[:-1])
    yield "values one long", tset(f"{first}.values", lambda v: torch.cat([v, v[:1]]))
    yield "values int32", tset(f"{first}.values", lambda v: v.to(torch.int32))
    yield "values 2-D", tset(f"{first}.values", lambda v: v.reshape(1, -1))
    yield "mask padding bit", tset(f"{first}.mask", lambda m: torch.cat([m[:-1], m[-1:] | 0x80]))
    yield "mask one bit more", tset(f"{first}.mask", lambda m: torch.cat([m[:1] ^ 1, m[1:]]))
    yield "mask int8", tset(f"{first}.mask", lambda m: m.to(torch.int8))
    yield "mask one byte short", tset(f"{first}.mask", lambda m: m[:-1])
    yield "stray tensor", lambda t: t.__setitem__("extra", torch.zeros(1))
    yield "missing values", lambda t: t.pop(f"{first}.values")
    yield "missing stored a", lambda t: t.pop(f"{stored}.a")
    yield "a wrong shape", tset(f"{stored}.a", lambda a: a[:, :-1])
    yield "a int32", tset(f"{stored}.a", lambda a: a.to(torch.int32))


def invalid_edits(path, work, meta: dict, tensors: dict):
    """Files made invalid on purpose, each written three ways: with the original digests
    (integrity must catch it), re-digested as version 2 and as version 1 without digests
    (the structure and type checks must catch it). Yields (label, path of the variant)."""
    first, stored = "m.q", "m.v"
    md0, raw = _read_raw(path)
    edits = [(f"meta: {lb}", fn, None) for lb, fn in _meta_edits(first)]
    edits += [(f"tensor: {lb}", None, fn) for lb, fn in _tensor_edits(first, stored)]
    for label, mfn, tfn in edits:
        m = json.loads(json.dumps(meta))
        t = dict(raw)
        if mfn:
            mfn(m)
        if tfn:
            tfn(t)
        lori = json.dumps(m, separators=(",", ":"))
        _resave(work, {**md0, "lori": lori}, t)
        yield f"{label} [old digests]", work
        digests = {"algorithm": F.DIGEST, "metadata": {"lori": F._text_digest(lori)},
                   "tensors": {k: F.tensor_digest(v) for k, v in t.items()}}
        _resave(work, {**md0, "lori": lori, "digests": json.dumps(digests)}, t)
        yield f"{label} [re-digested]", work
        _resave(work, {"format": F.FORMAT, "format_version": "1", "lori": lori}, t)
        yield f"{label} [version 1]", work
    # header-level metadata edits
    for label, md in (("format other", {**md0, "format": "x"}),
                      ("version 3", {**md0, "format_version": "3"}),
                      ("version 0", {**md0, "format_version": "0"}),
                      ("version ' 2'", {**md0, "format_version": " 2"}),
                      ("version 1 with digests", {**md0, "format_version": "1"}),
                      ("no digests", {k: v for k, v in md0.items() if k != "digests"}),
                      ("digests not JSON", {**md0, "digests": "{"}),
                      ("digests algorithm md5", {**md0, "digests": md0["digests"].replace(
                          "sha256", "md5")}),
                      ("lori not JSON", {**md0, "lori": md0["lori"][:-1]}),
                      ("no lori", {k: v for k, v in md0.items() if k != "lori"}),
                      ("no metadata", {})):
        _resave(work, md, raw)
        yield f"header: {label}", work


def within_chunk_swap(path, work, meta, raw_tensors):
    """Two mask bits moved within one 64-row chunk (the values kept): every structure check
    passes (same chunk totals), only the digest can tell. Yields (label, path, digests?)."""
    md0, raw = _read_raw(path)
    words = F._words_from_bits(raw["m.q.mask"], 70, 5)
    bools = F.unpack_mask(words, 5)
    on = bools[:64].nonzero().tolist()
    off = (~bools[:64]).nonzero().tolist()
    b2 = bools.clone()
    b2[tuple(on[0])] = False
    b2[tuple(off[-1])] = True
    t = {**raw, "m.q.mask": F._bits_from_words(F.pack_mask(b2), 5)}
    _resave(work, md0, t)
    yield "mask bit moved within a chunk [old digests]", work, True
    _resave(work, {"format": F.FORMAT, "format_version": "1", "lori": md0["lori"]}, t)
    yield "mask bit moved within a chunk [version 1]", work, False

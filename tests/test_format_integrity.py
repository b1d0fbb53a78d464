"""The adapter file format's integrity (digests, version 1 compatibility, one exception type)
and PackedB.validate's structure checks."""
import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import file_variants as V
import lori_kernels as L
from lori_kernels import packing
from lori_kernels.testing import random_packed
from lori_kernels.workflow import format as F


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "a.safetensors"
    meta, tensors = V.sample_file(path)
    return path, meta, tensors


def _raw(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def test_roundtrip_and_digests(saved):
    path, meta, tensors = saved
    md, raw = _raw(path)
    assert md["format_version"] == "2" == str(F.FORMAT_VERSION)
    d = json.loads(md["digests"])
    assert d["algorithm"] == F.DIGEST and set(d["tensors"]) == set(tensors)
    assert all(d["tensors"][k] == F.tensor_digest(t) for k, t in tensors.items())
    got_meta, got = F.read_adapter(path)
    assert got_meta == meta
    for k, t in tensors.items():
        if k.endswith(".mask"):
            torch.testing.assert_close(F._bits_from_words(got[k], meta["layers"][k[:-5]]["rank"]), t)
        else:
            assert got[k].dtype == t.dtype and torch.equal(got[k], t), k


def test_digest_covers_dtype_and_shape():
    t = torch.arange(6, dtype=torch.int32)
    assert F.tensor_digest(t) != F.tensor_digest(t.view(torch.float32))
    assert F.tensor_digest(t) != F.tensor_digest(t.reshape(2, 3))
    assert F.tensor_digest(t) == F.tensor_digest(t.clone())
    assert F.tensor_digest(torch.zeros(0)) != F.tensor_digest(torch.zeros(0, dtype=torch.int32))


def test_version1_files_still_read(saved, tmp_path):
    path, meta, _ = saved
    md, raw = _raw(path)
    v1 = tmp_path / "v1.safetensors"
    save_file(raw, str(v1), metadata={"format": md["format"], "format_version": "1",
                                      "lori": md["lori"]})
    assert V.snapshot(F.read_adapter(v1)) == V.snapshot(F.read_adapter(path))


@pytest.mark.parametrize("field", ["values", "mask", "offsets", "a"])
def test_flipped_tensor_byte_named(saved, tmp_path, field):
    path, _, _ = saved
    md, raw = _raw(path)
    name = "m.v.a" if field == "a" else f"m.q.{field}"
    t = raw[name].clone()
    t.view(-1).view(torch.uint8)[0] ^= 1
    raw[name] = t
    bad = tmp_path / "bad.safetensors"
    save_file(raw, str(bad), metadata=md)
    with pytest.raises(F.AdapterFileError, match=f"'{name}' does not match its sha256") as e:
        F.read_adapter(bad)
    assert str(bad) in str(e.value)


def test_flipped_metadata_named(saved, tmp_path):
    path, _, _ = saved
    md, raw = _raw(path)
    md["lori"] = md["lori"].replace('"alpha":8.0', '"alpha":9.0', 1)
    bad = tmp_path / "bad.safetensors"
    save_file(raw, str(bad), metadata=md)
    with pytest.raises(ValueError, match="metadata 'lori' does not match its sha256"):
        F.read_adapter(bad)


def test_one_exception_type(tmp_path, saved):
    """Every load failure is a ValueError (AdapterFileError) naming the file, cause chained."""
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(F.AdapterFileNotFoundError) as e:
        F.read_adapter(missing)
    assert isinstance(e.value, ValueError) and isinstance(e.value, FileNotFoundError)
    assert str(missing) in str(e.value)
    cases = {"directory": tmp_path, "empty": b"", "garbage": b"\x07" * 100,
             "pickle": pickle.dumps({"a": torch.zeros(3)}), "json": b'{"a": 1}'}
    for what, content in cases.items():
        p = content if what == "directory" else tmp_path / f"{what}.bin"
        if what != "directory":
            p.write_bytes(content)
        with pytest.raises(F.AdapterFileError) as e:
            F.read_adapter(p)
        assert str(p) in str(e.value), what
        assert e.value.__cause__ is not None or "not a valid" in str(e.value), what
    # safetensors' own error is chained, not leaked
    path, _, _ = saved
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="cannot be read") as e:
        F.read_adapter(trunc)
    assert type(e.value.__cause__).__name__ == "SafetensorError"


def test_field_types_named(saved, tmp_path):
    path, meta, tensors = saved
    for edit, msg in ((lambda m: m["layers"]["m.q"].update(alpha=float("nan")), "m.q.alpha"),
                      (lambda m: m["layers"]["m.q"].update(alpha="8"), "m.q.alpha"),
                      (lambda m: m["layers"]["m.q"].update(seed=" 3"), "m.q.seed"),
                      (lambda m: m["layers"]["m.q"].update(seed=str(1 << 64)), r"2\*\*64"),
                      (lambda m: m["layers"]["m.q"].update(rank=True), "m.q.rank"),
                      (lambda m: m.update(adapter_seed="03"), "adapter_seed"),
                      (lambda m: m.update(a_spec_version=True), "a_spec_version")):
        m = json.loads(json.dumps(meta))
        edit(m)
        p = tmp_path / "e.safetensors"
        md, raw = _raw(path)
        lori = json.dumps(m)
        digests = {"algorithm": F.DIGEST, "metadata": {"lori": F._text_digest(lori)},
                   "tensors": {k: F.tensor_digest(v) for k, v in raw.items()}}
        save_file(raw, str(p), metadata={**md, "lori": lori, "digests": json.dumps(digests)})
        with pytest.raises(F.AdapterFileError, match=msg):
            F.read_adapter(p)


def test_load_adapter_corrupt_file_is_value_error(saved, tmp_path):
    path, _, _ = saved
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    model = torch.nn.Sequential()
    with pytest.raises(ValueError, match="sha256"):
        L.workflow.load_adapter(model, bad)


# ---- PackedB.validate -----------------------------------------------------------------------

@pytest.fixture
def packed():
    return random_packed(150, 40, 0.3, generator=torch.Generator().manual_seed(2))


def test_validate_accepts_valid(packed):
    assert packed.validate() is packed
    empty = L.pack_bitmask(torch.zeros(0, 3))
    empty.validate()


def test_validate_names_the_fault(packed):
    p = packed
    o = p.offsets.clone(); o[0] = 1
    cases = [((p.mask, p.values, o), "offsets\\[0\\] must be 0")]
    o = p.offsets.clone(); o[1], o[2] = o[2].item(), o[1].item()
    cases.append(((p.mask, p.values, o), "non-decreasing: offsets\\[2\\]"))
    cases.append(((p.mask, p.values[:-1], p.offsets), "entries but values has"))
    m = p.mask.clone(); m[100, 1] |= 1 << 20      # bit 52 >= rank 40, row 100
    cases.append(((m, p.values, p.offsets), "positions >= rank \\(40\\), first in row 100"))
    m = p.mask.clone(); m[70, 0] ^= 1             # chunk 1 gains or loses a bit
    o = p.offsets.clone()
    cases.append(((m, p.values, o), "chunk 1 \\(rows 64..127\\)"))
    cases.append(((p.mask, p.values.to("meta"), p.offsets), "one device"))
    for (mm, vv, oo), msg in cases:
        with pytest.raises(ValueError, match=msg):
            packing.validate_packed(mm, vv, oo, 40)


def test_validate_cannot_see_a_bit_moved_within_a_chunk(packed):
    """The documented limit: same chunk totals, another valid pattern (the file digest is what
    catches it on load)."""
    dense = packed.bool_mask()
    r_on, c_on = dense[:64].nonzero()[0].tolist()
    r_off, c_off = (~dense[:64]).nonzero()[0].tolist()
    dense[r_on, c_on], dense[r_off, c_off] = False, True
    moved = packing.PackedB(packing.pack_mask(dense), packed.values, packed.offsets, 40)
    moved.validate()
    assert not torch.equal(moved.to_dense(), packed.to_dense())

"""Loading an adapter file is all or nothing: every field that would be half-applied, NaN or
truncated is a ValueError naming it, and the model stays bit-identical (state hash before and
after). Plus the path and naming traps of the layer below."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lori_kernels.workflow import inject, load_adapter, lori_layers, save_adapter
from lori_kernels.workflow import format as F
from lori_kernels.workflow.format import write_adapter_file
from lori_kernels.workflow.inject import wrap_linear

from hf_models import state_hash  # noqa: E402


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                         nn.Linear(8, 4))


def saved(tmp_path):
    model = inject(small_model(), ["0", "2", "4"], rank=2, alpha=4, seed=1)
    with torch.no_grad():
        for layer in lori_layers(model).values():
            layer.adapters["default"].values.normal_()
    save_adapter(model, tmp_path / "good.safetensors")
    return model


def crafted(tmp_path, edit, name="bad.safetensors"):
    """The good file with its JSON metadata edited by `edit(meta)`."""
    src = tmp_path / "good.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["lori"])
    tensors = load_file(str(src))
    edit(meta)
    _write_unchecked(tmp_path / name, meta, tensors)
    return tmp_path / name


def _write_unchecked(path, meta, tensors):
    """write_adapter_file without its own refusal of NaN/inf in the metadata: a file another
    writer could have made, with valid digests, so the loader's field checks are what is
    tested."""
    from safetensors.torch import save_file

    lori = json.dumps(meta, separators=(",", ":"))  # allow_nan: NaN/Infinity tokens
    digests = {"algorithm": F.DIGEST, "metadata": {"lori": F._text_digest(lori)},
               "tensors": {k: F.tensor_digest(t) for k, t in sorted(tensors.items())}}
    save_file(tensors, str(path), metadata={
        "format": F.FORMAT, "format_version": str(F.FORMAT_VERSION), "lori": lori,
        "digests": json.dumps(digests, separators=(",", ":"))})


def last_layer(meta):
    return meta["layers"][list(meta["layers"])[-1]]


CASES = [
    ("adapter_name", lambda m: m.update(adapter_name="")),
    ("adapter_name", lambda m: m.update(adapter_name="a.b")),
    ("adapter_name", lambda m: m.update(adapter_name=5)),
    ("adapter_seed", lambda m: m.update(adapter_seed="abc")),
    ("adapter_seed", lambda m: m.update(adapter_seed=1.5)),
    ("alpha", lambda m: last_layer(m).update(alpha=float("nan"))),
    ("alpha", lambda m: last_layer(m).update(alpha=float("inf"))),
    ("alpha", lambda m: last_layer(m).update(alpha=True)),
    ("alpha", lambda m: last_layer(m).update(alpha=0)),
    ("alpha", lambda m: last_layer(m).update(alpha="8")),
    ("seed", lambda m: last_layer(m).update(seed=1.5)),
    ("seed", lambda m: last_layer(m).update(seed="1.5")),
    ("seed", lambda m: last_layer(m).update(seed=-3)),
]


@pytest.mark.parametrize("field,edit", CASES, ids=[f"{f}-{i}" for i, (f, _) in
                                                    enumerate(CASES)])
def test_bad_field_is_a_value_error_and_the_model_is_untouched(tmp_path, field, edit):
    saved(tmp_path)
    bad = crafted(tmp_path, edit)
    model = small_model()
    h = state_hash(model)
    # (the file reader itself may refuse some first, with its own message: still a ValueError)
    with pytest.raises(ValueError, match=rf"{field}|invalid literal"):
        load_adapter(model, bad)
    assert state_hash(model) == h
    assert not lori_layers(model)  # no half-applied adapter


def test_bad_adapter_name_argument(tmp_path):
    saved(tmp_path)
    model = small_model()
    h = state_hash(model)
    for name in ("", "a.b", 5):
        with pytest.raises(ValueError, match="adapter_name"):
            load_adapter(model, tmp_path / "good.safetensors", name)
    assert state_hash(model) == h


def test_a_later_layer_missing_leaves_the_first_ones_alone(tmp_path):
    saved(tmp_path)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))  # no layer "4"
    h = state_hash(model)
    with pytest.raises(ValueError, match="'4' is not in the model"):
        load_adapter(model, tmp_path / "good.safetensors")
    assert state_hash(model) == h


def test_root_layer_name_is_refused_not_self_containing(tmp_path):
    root = nn.Linear(8, 16)
    with pytest.raises(ValueError, match="root module"):
        wrap_linear(root, "")
    assert not list(root.children())
    saved(tmp_path)

    def to_root(meta):
        meta["layers"] = {"": meta["layers"]["0"]}
        meta["target_modules"] = [""]

    src = tmp_path / "good.safetensors"
    tensors = {k.replace("0.", ".", 1) if k.startswith("0.") else k: v
               for k, v in load_file(str(src)).items() if k.startswith("0.")}
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["lori"])
    to_root(meta)
    write_adapter_file(tmp_path / "root.safetensors", meta, tensors)
    h = state_hash(root)
    with pytest.raises(ValueError):
        load_adapter(root, tmp_path / "root.safetensors")
    assert state_hash(root) == h and not list(root.children())


def test_save_and_load_a_directory(tmp_path):
    model = saved(tmp_path)
    x = torch.randn(3, 8)
    y = model(x)
    save_adapter(model, tmp_path / "adir")  # a directory: adapter_model.safetensors in it
    assert (tmp_path / "adir" / "adapter_model.safetensors").exists()
    (tmp_path / "existing").mkdir()
    save_adapter(model, tmp_path / "existing")
    for d in ("adir", "existing"):
        back = load_adapter(small_model(), tmp_path / d)
        torch.testing.assert_close(back(x), y, rtol=0, atol=0)
    (tmp_path / "empty").mkdir()
    for missing in (tmp_path / "empty", tmp_path / "nowhere.safetensors"):
        with pytest.raises(ValueError, match="no such adapter file"):
            load_adapter(small_model(), missing)

"""ServingModel: many LoRI adapters in one model, adapter_names per sequence, against PEFT's
mixed-batch inference and against one LoRILinear model per adapter."""
import copy
import threading

import pytest
import torch

import lori_kernels as L
from lori_kernels.testing import assert_within_rule
from lori_kernels.workflow import (calibrate_masks, export_peft, import_peft, inject,
                                   load_adapter, lori_layers, save_adapter)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
from hf_models import LLAMA_TARGETS, tiny_llama  # noqa: E402

IDS = torch.randint(0, 64, (5, 6), generator=torch.Generator().manual_seed(2))
MIX = ["a1", "a0", None, "a2", "a1"]


def _lori(k, targets=LLAMA_TARGETS):
    """A trained-looking LoRI-S adapter number k on the tiny Llama."""
    model = tiny_llama()
    inject(model, targets, rank=8, alpha=16, seed=100 + k,
           distribution=("rademacher", "uniform")[k % 2], adapter_name=f"a{k}")
    g = torch.Generator().manual_seed(k)
    with torch.no_grad():
        for layer in lori_layers(model).values():
            v = layer.adapters[f"a{k}"].values
            v.copy_(torch.randn(v.shape, generator=g) * 0.2)
    calibrate_masks(model, 0.8, init="keep", adapter_name=f"a{k}")
    return model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    out = {}
    for k in range(3):
        m = _lori(k, LLAMA_TARGETS if k != 2 else ["q_proj", "v_proj", "down_proj"])
        save_adapter(m, d / f"a{k}.safetensors", f"a{k}")
        export_peft(m, d / f"peft{k}", f"a{k}", dtype=torch.float32)
        out[f"a{k}"] = (m, d / f"a{k}.safetensors", d / f"peft{k}")
    return out


def _serving(adapters, names=("a0", "a1", "a2")):
    sm = L.ServingModel(tiny_llama(), LLAMA_TARGETS, rank=8, capacity=2)
    for n in names:
        sm.load_adapter(adapters[n][1])
    return sm


def _peft(adapters, dtype=torch.float32):
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(adapters["a0"][2]),
                                        adapter_name="a0")
    for n in ("a1", "a2"):
        pm.load_adapter(str(adapters[n][2]), adapter_name=n)
    return pm.to(dtype).eval()


def _peft_names(names):
    return ["__base__" if n is None else n for n in names]


@torch.no_grad()
def test_mixed_batch_equals_peft_and_lori_linear(adapters):
    sm = _serving(adapters)
    y = sm(input_ids=IDS, adapter_names=MIX).logits
    pm32, pm64 = _peft(adapters), _peft(adapters, torch.float64)
    base = pm32(input_ids=IDS, adapter_names=_peft_names(MIX)).logits
    ref = pm64(input_ids=IDS, adapter_names=_peft_names(MIX)).logits
    assert_within_rule(y, ref, base, "serving vs PEFT mixed batch")
    # "__base__" (PEFT's spelling) and None are the base model; adapters did change outputs
    y_base = sm(input_ids=IDS, adapter_names=["__base__"] * 5).logits
    torch.testing.assert_close(y_base, tiny_llama()(input_ids=IDS).logits, rtol=0, atol=0)
    assert not torch.allclose(y[0], y_base[0])
    torch.testing.assert_close(sm(input_ids=IDS).logits, y_base, rtol=0, atol=0)
    # each adapter against a LoRILinear model holding only it, on that adapter's sequences
    for n in ("a0", "a1", "a2"):
        rows = [i for i, m in enumerate(MIX) if m == n]
        lm = load_adapter(tiny_llama(), adapters[n][1])
        y_lm = lm(input_ids=IDS[rows]).logits
        assert_within_rule(y[rows], ref[rows], y_lm, f"serving vs LoRILinear {n}")


@torch.no_grad()
def test_add_remove_at_runtime_and_from_lori_models(adapters):
    sm = _serving(adapters, names=("a0",))
    assert sm.adapter_names == ["a0"]
    slot = sm.add_adapter("b1", adapters["a1"][0], adapter_name="a1")  # a LoRILinear model
    assert slot == 1 and "b1" in sm
    y1 = sm(input_ids=IDS[:2], adapter_names=["b1", "a0"]).logits
    lm = load_adapter(tiny_llama(), adapters["a1"][1])
    torch.testing.assert_close(y1[0], lm(input_ids=IDS[:1]).logits[0], rtol=1e-5, atol=1e-5)
    plan = sm.plan(["b1", None])                  # a step planned before the removal
    sm.delete_adapter("b1")
    with pytest.raises(KeyError, match="b1"):
        sm(input_ids=IDS[:1], adapter_names=["b1"])
    torch.testing.assert_close(sm(input_ids=IDS[:2], plan=plan).logits[0], y1[0], rtol=0, atol=0)
    del plan
    sm.load_adapter(adapters["a2"][1])           # covers 3 of the 7 projections
    assert sm.adapter_names == ["a0", "a2"]
    with pytest.raises(TypeError, match="list"):
        sm(input_ids=IDS[:1], adapter_names="a0")
    with pytest.raises(ValueError, match="already served"):
        sm.load_adapter(adapters["a0"][1])
    with pytest.raises(ValueError, match="not a non-empty|__base__"):
        sm.add_adapter("__base__", adapters["a1"][0])


def test_explicit_a_adapters_are_refused(adapters, tmp_path):
    imported = import_peft(tiny_llama(), adapters["a1"][2], adapter_name="imp")
    save_adapter(imported, tmp_path / "imp.safetensors", "imp")
    sm = _serving(adapters, names=("a0",))
    before = [layer.pool.snapshot() for layer in sm.layers.values()]
    with pytest.raises(ValueError, match="stored A"):
        sm.load_adapter(tmp_path / "imp.safetensors")
    with pytest.raises(ValueError, match="stored A"):
        sm.add_adapter("imp", imported)
    assert sm.adapter_names == ["a0"]
    assert all(layer.pool.snapshot() is s for layer, s in zip(sm.layers.values(), before))


def test_add_is_all_or_nothing_over_layers(adapters):
    sm = _serving(adapters, names=("a0",))
    src = {n: layer.adapters["a1"] for n, layer in lori_layers(adapters["a1"][0]).items()}
    bad = dict(src)
    last = list(bad)[-1]
    bad[last] = dict(b=src[last].packed(), seed=1, scale=1e39)
    before = [layer.pool.snapshot() for layer in sm.layers.values()]
    with pytest.raises(ValueError, match="scale must be finite"):
        sm.add_adapter("bad", bad)
    with pytest.raises(ValueError, match="does not serve"):
        sm.add_adapter("bad", {"model.nope": src[last]})
    assert sm.adapter_names == ["a0"]
    assert all(layer.pool.snapshot() is s for layer, s in zip(sm.layers.values(), before))


@torch.no_grad()
def test_save_and_restore_adapters(adapters, tmp_path):
    sm = _serving(adapters)
    y = sm(input_ids=IDS, adapter_names=MIX).logits
    paths = sm.save_adapters(tmp_path / "saved")
    assert len(paths) == 3
    sm2 = L.ServingModel(tiny_llama(), LLAMA_TARGETS, rank=8)
    assert sm2.load_adapters(tmp_path / "saved") == ["a0", "a1", "a2"]
    torch.testing.assert_close(sm2(input_ids=IDS, adapter_names=MIX).logits, y, rtol=0, atol=0)
    # the saved file is the ordinary adapter format: a LoRILinear model loads it too
    lm = load_adapter(tiny_llama(), paths[1])
    torch.testing.assert_close(lm(input_ids=IDS[:1]).logits[0], y[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_generate_per_sequence_adapter(adapters):
    sm = _serving(adapters)
    out = sm.generate(input_ids=IDS[:2], adapter_names=["a1", None], max_new_tokens=3,
                      do_sample=False, pad_token_id=0)
    lm = load_adapter(tiny_llama(), adapters["a1"][1])
    ref = lm.generate(input_ids=IDS[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    base = tiny_llama().generate(input_ids=IDS[1:2], max_new_tokens=3, do_sample=False,
                                 pad_token_id=0)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], base[0])


@torch.no_grad()
def test_serving_while_adapters_change(adapters):
    """A thread adds and removes adapters while steps run: every step equals the output of
    the adapters its plan named."""
    sm = _serving(adapters, names=("a0",))
    expect = {n: sm(input_ids=IDS[:1], adapter_names=[n]).logits[0] for n in ("a0",)}
    sm.load_adapter(adapters["a1"][1])
    expect["a1"] = sm(input_ids=IDS[:1], adapter_names=["a1"]).logits[0]
    sm.delete_adapter("a1")
    stop, errors = threading.Event(), []

    def churn():
        i = 0
        while not stop.is_set():
            sm.load_adapter(adapters["a1"][1], "a1")
            sm.delete_adapter("a1")
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(40):
            slot_of = sm._state[0]
            names = ["a1" if "a1" in slot_of else "a0", "a0"]
            try:
                plan = sm.plan(names)
            except KeyError:  # removed between the look and the plan
                continue
            y = sm(input_ids=IDS[:1].repeat(2, 1), plan=plan).logits
            for row, n in zip(y, names):
                if not torch.allclose(row, expect[n], rtol=1e-5, atol=1e-5):
                    errors.append(n)
    finally:
        stop.set()
        t.join()
    assert not errors

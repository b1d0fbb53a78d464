"""The model layer (get_lori_model / LoRIModel) on a tiny Llama and a tiny BERT classifier:
the LoRI workflow as a PEFT user writes it, and each silent trap of the layer below turned into
an error or the right answer."""
import json
import os

import pytest
import torch

import lori_kernels as lk
from lori_kernels import LoRIConfig, LoRIModel, get_lori_model
from lori_kernels.nn import LoRILinear
from lori_kernels.workflow import calibrate_masks, inject, lori_layers

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
from hf_models import LLAMA_TARGETS, state_hash, tiny_bert_classifier, tiny_llama  # noqa: E402

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
CFG = LoRIConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, seed=3)


def logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


def loss(model):
    return model(input_ids=IDS).logits.float().pow(2).mean()


def train(model, opt, steps=2):
    for _ in range(steps):
        opt.zero_grad()
        loss(model).backward()
        opt.step()


def adamw(params, lr=1e-2):
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=0.0)


def trained(cfg=CFG, sparse=True):
    lm = get_lori_model(tiny_llama(), cfg)
    train(lm, adamw(lm.parameters()))
    if sparse:
        switch = lm.calibrate()
        train(lm, adamw(switch.new_parameters))
    return lm


def test_workflow_end_to_end(tmp_path, capsys):
    lm = get_lori_model(tiny_llama(), CFG)
    assert isinstance(lm.base_model.model.layers[0].self_attn.q_proj, LoRILinear)
    assert lm.config.hidden_size == 32  # attribute access reaches the base model
    torch.testing.assert_close(logits(lm), logits(tiny_llama()), rtol=0, atol=0)  # B = 0
    lm.print_trainable_parameters()
    trainable, total = lm.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out
    assert trainable == sum(l.adapters["default"].nnz for l in lori_layers(lm).values())
    train(lm, adamw(lm.parameters()))
    switch = lm.calibrate()  # LoRIConfig's sparsity 0.9, global scope
    assert switch.phase == "sparse" and switch.rebuild == ("optimizer", "lr_scheduler")
    assert switch.trainable == lm.get_nb_trainable_parameters()[0] < trainable * 0.15
    before = [p.detach().clone() for p in switch.new_parameters]
    train(lm, adamw(switch.new_parameters))
    assert any(not torch.equal(a, p) for a, p in zip(before, switch.new_parameters))
    y = logits(lm)
    lm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORI" and cfg["r"] == 4
    assert cfg["lori_layers"]["model.layers.0.mlp.down_proj"]["in_features"] == 48
    back = LoRIModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(back), y, rtol=0, atol=0)
    assert back.get_nb_trainable_parameters()[0] == 0  # is_trainable=False: inference
    again = LoRIModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert again.get_nb_trainable_parameters()[0] == switch.trainable


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2), lambda ps: torch.optim.SGD(ps, lr=1e-2)])
@pytest.mark.parametrize("how", ["calibrate", "workflow", "state_dict"])
def test_stale_optimizer_after_the_phase_switch_raises(make_opt, how):
    lm = get_lori_model(tiny_llama(), CFG)
    opt = make_opt([p for p in lm.parameters() if p.requires_grad])
    train(lm, opt)
    if how == "calibrate":
        lm.calibrate()
    elif how == "workflow":  # the layer below, as a plain torch user calls it
        calibrate_masks(lm.base_model, 0.9)
    else:  # a LoRI-S checkpoint loaded into this LoRI-D model switches its structure
        lm.set_adapter_state_dict(trained().get_adapter_state_dict())
    opt.zero_grad()
    loss(lm).backward()
    with pytest.raises(RuntimeError, match="replaced.*train(s)? nothing|train nothing"):
        opt.step()
    opt2 = make_opt([p for p in lm.parameters() if p.requires_grad])  # rebuilt: trains
    w = [p.detach().clone() for g in opt2.param_groups for p in g["params"]]
    train(lm, opt2, 1)
    assert any(not torch.equal(a, p) for a, p in zip(w, (p for g in opt2.param_groups
                                                          for p in g["params"])))


def test_state_dict_carries_the_recipe():
    lm = trained(sparse=False)
    sd = lm.state_dict()
    key = "base_model.model.layers.0.self_attn.q_proj.adapters.default._extra_state"
    recipe = json.loads(bytes(sd[key].numpy()).decode())
    assert recipe["rank"] == 4 and recipe["alpha"] == 8 and recipe["phase"] == "dense"
    assert int(recipe["seed"]) == lk.layer_seed(3, "model.layers.0.self_attn.q_proj")
    # every other recipe: refused with the field named, and the model untouched
    for field, value in [("seed", 4), ("r", 8), ("lora_alpha", 16),
                         ("distribution", "uniform")]:
        other = get_lori_model(tiny_llama(), LoRIConfig(**{**CFG.to_dict(), field: value}))
        h = state_hash(other)
        name = {"r": "rank", "lora_alpha": "alpha"}.get(field, field)
        with pytest.raises(ValueError, match=rf"{name} is .* in the state dict"):
            other.load_state_dict(sd)
        assert state_hash(other) == h
    # the raw model (torch's own load_state_dict) refuses too
    raw = inject(tiny_llama(), LLAMA_TARGETS, rank=4, alpha=8, seed=4)
    raw_sd = {k[len("base_model."):]: v for k, v in sd.items()}
    with pytest.raises(ValueError, match="seed is"):
        raw.load_state_dict(raw_sd)
    # a state dict without recipes cannot be checked and is refused
    stripped = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    fresh = get_lori_model(tiny_llama(), CFG)
    with pytest.raises(ValueError, match="no LoRI recipe"):
        fresh.load_state_dict(stripped, strict=False)


def test_sparse_state_into_a_fresh_dense_model_switches_structure(tmp_path):
    lm = trained()
    y = logits(lm)
    fresh = get_lori_model(tiny_llama(), CFG)
    fresh.load_state_dict(lm.state_dict())  # the whole state dict, LoRI-S into LoRI-D
    torch.testing.assert_close(logits(fresh), y, rtol=0, atol=0)
    assert all(l.adapters["default"].phase == "sparse" for l in lori_layers(fresh).values())
    # the adapter-only checkpoint: a small fraction of the whole state
    sd = lm.get_adapter_state_dict()
    assert sum(v.numel() * v.element_size() for v in sd.values()) < 0.1 * sum(
        v.numel() * v.element_size() for v in lm.state_dict().values())
    fresh = get_lori_model(tiny_llama(), CFG)
    switch = fresh.set_adapter_state_dict(sd)
    assert switch is not None and switch.trainable == lm.get_nb_trainable_parameters()[0]
    torch.testing.assert_close(logits(fresh), y, rtol=0, atol=0)
    torch.save(sd, tmp_path / "ckpt.pt")  # a Trainer-style checkpoint, no pickled code
    sd2 = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert fresh.set_adapter_state_dict(sd2) is None  # same phase now: nothing to rebuild


def test_failed_load_state_dict_leaves_the_model_bit_identical():
    src = trained()
    sd = dict(src.state_dict())
    lm = get_lori_model(tiny_llama(), CFG)
    bad_shape = dict(sd)
    bad_shape["base_model.model.norm.weight"] = torch.ones(5)
    bad_pack = dict(sd)
    k = "base_model.model.layers.1.mlp.up_proj.adapters.default.offsets"
    bad_pack[k] = bad_pack[k] + 1
    partial = {k: v for k, v in sd.items() if "layers.1.mlp" not in k}
    wrong_key = {**sd, "base_model.nope": torch.zeros(1)}
    h = state_hash(lm)
    for bad, match in [(bad_shape, "norm.weight: shape"), (bad_pack, "offsets"),
                       (partial, "missing keys"), (wrong_key, "unexpected")]:
        with pytest.raises(ValueError, match=match):
            lm.load_state_dict(bad)
        assert state_hash(lm) == h
    with pytest.raises(ValueError, match="not adapter 'default'"):
        lm.set_adapter_state_dict({**src.get_adapter_state_dict(), "x": torch.zeros(1)})
    assert state_hash(lm) == h


def test_adapters_add_set_delete_only_active_trains():
    lm = get_lori_model(tiny_llama(), CFG)
    lm.add_adapter("other", LoRIConfig(r=2, lora_alpha=2, target_modules=["q_proj"], seed=9))
    assert lm.active_adapter == "default"  # added frozen and inactive, as PEFT
    train_names = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert train_names and all(".adapters.default." in n for n in train_names)
    lm.set_adapter("other")
    train_names = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert train_names and all(".adapters.other." in n for n in train_names)
    q = lm.base_model.model.layers[0].self_attn.q_proj
    assert [t[0] for t in q.terms] == ["other"]
    assert lm.base_model.model.layers[0].self_attn.k_proj.terms == ()  # no 'other' there
    with pytest.raises(ValueError, match="already exists"):
        lm.add_adapter("other", CFG)
    with pytest.raises(ValueError, match="identifier"):
        lm.add_adapter("a.b", CFG)
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        lm.set_adapter("nope")
    lm.delete_adapter("other")
    assert lm.active_adapters == ["default"] and "other" not in q.adapters
    with pytest.raises(ValueError, match="last adapter"):
        lm.delete_adapter("default")
    # the low-level inject: a second adapter becomes the only active and trainable one
    raw = inject(tiny_llama(), ["q_proj"], rank=2, alpha=2, seed=1, adapter_name="a")
    inject(raw, ["q_proj", "v_proj"], rank=2, alpha=2, seed=2, adapter_name="b")
    layer = raw.model.layers[0].self_attn.q_proj
    assert [t[0] for t in layer.terms] == ["b"]
    assert not layer.adapters["a"].values.requires_grad and layer.adapters["b"].values.requires_grad


def test_disable_adapter_merge_and_unload_unload():
    lm = trained()
    y, y0 = logits(lm), logits(tiny_llama())
    with lm.disable_adapter():
        torch.testing.assert_close(logits(lm), y0, rtol=0, atol=0)
    torch.testing.assert_close(logits(lm), y, rtol=0, atol=0)
    with pytest.raises(KeyError):
        with lm.disable_adapter():
            raise KeyError("inside")
    torch.testing.assert_close(logits(lm), y, rtol=0, atol=0)  # restored after an error
    merged = lm.merge_and_unload()
    assert isinstance(merged, transformers.LlamaForCausalLM) and not lori_layers(merged)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight,
                           tiny_llama().model.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(logits(merged), y, atol=1e-5, rtol=1e-5)
    lm2 = trained()
    lm2.merge_adapter()
    base = lm2.unload()  # without the adapter (unmerged first)
    torch.testing.assert_close(logits(base), y0, atol=1e-5, rtol=1e-5)


def test_merge_then_unwrap_is_refused_not_the_base():
    from lori_kernels.workflow import merge, merge_and_unload, unwrap

    raw = inject(tiny_llama(), LLAMA_TARGETS, rank=4, alpha=8, seed=1)
    for layer in lori_layers(raw).values():
        torch.nn.init.normal_(layer.adapters["default"].values, 0, 0.1)
    y = logits(raw)
    merge(raw)
    with pytest.raises(ValueError, match="merge_and_unload"):
        unwrap(raw)
    plain = merge_and_unload(raw)
    assert not lori_layers(plain)
    torch.testing.assert_close(logits(plain), y, atol=1e-5, rtol=1e-5)


def test_from_pretrained_refuses_another_base(tmp_path):
    lm = trained()
    lm.save_pretrained(tmp_path)
    other = tiny_llama(seed=1)  # same architecture and name, other weights
    h = state_hash(other)
    with pytest.raises(ValueError, match="other weights than the base"):
        LoRIModel.from_pretrained(other, tmp_path)
    assert state_hash(other) == h
    LoRIModel.from_pretrained(other, tmp_path, check_base=False)  # on request
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/another-model"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    named = tiny_llama()
    named.config._name_or_path = "org/this-model"
    with pytest.raises(ValueError, match="trained on base 'org/another-model'"):
        LoRIModel.from_pretrained(named, tmp_path)
    wider = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="in the model but was"):
        LoRIModel.from_pretrained(wider, tmp_path, check_base=False)


def test_multiple_adapters_saved_in_subdirectories(tmp_path):
    lm = trained()
    lm.add_adapter("second", LoRIConfig(r=2, lora_alpha=4, target_modules=["v_proj"], seed=5))
    lm.set_adapter("second")
    train(lm, adamw(lm.parameters()))
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "second" / "adapter_model.safetensors").exists()
    back = LoRIModel.from_pretrained(tiny_llama(), tmp_path)
    back.load_adapter(tmp_path / "second", "second")
    for name in ("default", "second"):
        lm.set_adapter(name)
        back.set_adapter(name)
        torch.testing.assert_close(logits(back), logits(lm), rtol=0, atol=0)


def test_modules_to_save_trained_saved_and_disabled(tmp_path):
    cfg = LoRIConfig(r=4, lora_alpha=8, target_modules=["query", "value"], seed=1,
                     modules_to_save=["classifier"])
    model = tiny_bert_classifier()
    head0 = model.classifier.weight.detach().clone()
    lm = get_lori_model(model, cfg)
    names = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert "base_model.classifier.modules_to_save.default.weight" in names
    assert lm.classifier.weight.shape == (3, 32)  # attribute access reaches the active copy
    ids = IDS % 64
    labels = torch.tensor([0, 2])
    opt = adamw(lm.parameters(), lr=5e-2)
    for _ in range(3):
        opt.zero_grad()
        lm(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    assert not torch.equal(lm.base_model.classifier.modules_to_save["default"].weight, head0)
    assert torch.equal(lm.base_model.classifier.original_module.weight, head0)
    y = lm(input_ids=ids).logits.detach()
    with lm.disable_adapter():  # the original head and no delta: the base model
        torch.testing.assert_close(lm(input_ids=ids).logits, tiny_bert_classifier()(
            input_ids=ids).logits, rtol=0, atol=0)
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "modules_to_save.safetensors").exists()
    back = LoRIModel.from_pretrained(tiny_bert_classifier(), tmp_path)
    torch.testing.assert_close(back(input_ids=ids).logits, y, rtol=0, atol=0)
    merged = back.merge_and_unload()
    assert isinstance(merged.classifier, torch.nn.Linear)
    torch.testing.assert_close(merged(input_ids=ids).logits, y, atol=1e-5, rtol=1e-5)


def test_meta_device_injection_then_load_weights(tmp_path):
    trained().save_pretrained(tmp_path)
    ref = LoRIModel.from_pretrained(tiny_llama(), tmp_path)
    accelerate = pytest.importorskip("accelerate")
    with torch.device("meta"):  # buffers on meta too: they are in no state dict
        empty = transformers.LlamaForCausalLM(tiny_llama().config)
    lm = get_lori_model(empty, CFG)  # no Tensor.item() on meta tensors
    assert lm.base_model.model.layers[0].self_attn.q_proj.adapters["default"].values.is_meta
    with pytest.raises(ValueError, match="inv_freq.*meta device"):
        lm.load_base_weights(tiny_llama().state_dict())
    with accelerate.init_empty_weights():
        empty = transformers.LlamaForCausalLM(tiny_llama().config)
    lm = get_lori_model(empty, CFG)
    with pytest.raises(ValueError, match="shape"):
        lm.load_base_weights({"model.norm.weight": torch.ones(3)}, strict=False)
    lm.load_base_weights(tiny_llama().state_dict())
    assert not any(t.is_meta for t in lm.state_dict().values())
    torch.testing.assert_close(logits(lm), logits(tiny_llama()), rtol=0, atol=0)
    train(lm, adamw(lm.parameters()))  # LoRI-D trains after materialisation
    with accelerate.init_empty_weights():
        empty = transformers.LlamaForCausalLM(tiny_llama().config)
    lm = LoRIModel(empty)
    lm.load_base_weights(tiny_llama().state_dict())
    lm.load_adapter(tmp_path, "default")
    torch.testing.assert_close(logits(lm), logits(ref), rtol=0, atol=0)


def test_generate_passes_through():
    lm = trained()
    out = lm.generate(input_ids=IDS[:1, :3], max_new_tokens=3, do_sample=False)
    merged_out = trained().merge_and_unload().generate(input_ids=IDS[:1, :3], max_new_tokens=3,
                                                       do_sample=False)
    assert out.shape == (1, 6) and torch.equal(out, merged_out)

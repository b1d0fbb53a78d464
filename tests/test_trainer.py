"""LoRITrainer (lori_kernels.integrations.transformers): both LoRI phases in one train(),
adapter-only checkpoints, bit-exact resume in each phase, save_model, and the Trainer features
a user turns on (mixed precision, accumulation, gradient checkpointing, torch.compile), each
on a tiny Llama for a few steps."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_models import LLAMA_TARGETS, tiny_bert_classifier, tiny_llama  # noqa: E402

from lori_kernels import LoRIConfig, LoRIModel, get_lori_model  # noqa: E402
from lori_kernels.integrations.transformers import LoRITrainer, adapter_phase  # noqa: E402

transformers.logging.set_verbosity_error()


class Tokens(torch.utils.data.Dataset):
    """A fixed random causal-LM set: 32 sequences of 12 tokens."""

    def __init__(self, n=32, length=12):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]),
                "labels": self.x[i]}


def _model(sparsity=0.5):
    return get_lori_model(tiny_llama(), LoRIConfig(r=4, lora_alpha=8,
                                                   target_modules=LLAMA_TARGETS,
                                                   sparsity=sparsity))


def _args(out, **kw):
    base = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(str(out), **base)


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _values(model):
    return {k: v.detach().clone() for k, v in model.get_adapter_state_dict().items()}


def test_both_phases_in_one_train(tmp_path):
    m = _model()
    t = LoRITrainer(m, _args(tmp_path), train_dataset=Tokens(), dense_steps=3)
    seen = []
    orig = t._switch_to_sparse

    def spy():
        dense = {k: v.detach().clone() for k, v in m.named_parameters() if v.requires_grad}
        orig()
        seen.append(dense)
    t._switch_to_sparse = spy
    t.train()
    assert len(seen) == 1 and t.switch_step == 3 and t.lori_phase == "sparse"
    # LoRI-D trained (B left zero), and LoRI-S trained on the calibrated mask: every layer's
    # values moved away from the zero re-initialisation, at sparsity 0.5
    assert all(v.abs().sum() > 0 for v in seen[0].values())
    layers = [mod for mod in m.modules() if hasattr(mod, "adapters")]
    assert len(layers) == 14
    total = sum(layer.adapters["default"].out_features * layer.adapters["default"].rank
                for layer in layers)
    kept = sum(layer.adapters["default"].nnz for layer in layers)
    assert kept == total - int(0.5 * total) or kept >= total // 2  # global top-k, ties kept
    for layer in layers:
        ad = layer.adapters["default"]
        assert ad.phase == "sparse" and ad.nnz < ad.out_features * ad.rank or kept < total
        assert ad.values.abs().sum() > 0, "LoRI-S trained nothing in a layer"
    opt = t.optimizer.optimizer if hasattr(t.optimizer, "optimizer") else t.optimizer
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in m.parameters() if p.requires_grad}
    # each phase has its own linear schedule from the full learning rate
    lrs = [h["learning_rate"] for h in t.state.log_history if "learning_rate" in h]
    assert lrs[0] == lrs[3] == pytest.approx(1e-2) and lrs[2] < lrs[0]


def test_dense_fraction_and_bad_arguments(tmp_path):
    t = LoRITrainer(_model(), _args(tmp_path, max_steps=4), train_dataset=Tokens(),
                    dense_fraction=0.5)
    t.train()
    assert t.switch_step == 2 and t.lori_phase == "sparse"
    with pytest.raises(ValueError, match="dense_steps must be an int"):
        LoRITrainer(_model(), _args(tmp_path), train_dataset=Tokens(), dense_steps=0)
    with pytest.raises(ValueError, match="dense_fraction must be in"):
        LoRITrainer(_model(), _args(tmp_path), train_dataset=Tokens(), dense_fraction=1.0)
    with pytest.raises(ValueError, match="not both"):
        LoRITrainer(_model(), _args(tmp_path), train_dataset=Tokens(), dense_steps=1,
                    dense_fraction=0.5)
    with pytest.raises(ValueError, match="must be a LoRIModel"):
        LoRITrainer(tiny_llama(), _args(tmp_path), train_dataset=Tokens(), dense_steps=1)
    m = _model()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        LoRITrainer(m, _args(tmp_path), train_dataset=Tokens(), dense_steps=2,
                    optimizers=(opt, None))
    with pytest.raises(ValueError, match="LoRI-S would never train"):
        LoRITrainer(_model(), _args(tmp_path), train_dataset=Tokens(), dense_steps=6).train()
    s = _model()
    s.calibrate()
    with pytest.raises(ValueError, match="already LoRI-S"):
        LoRITrainer(s, _args(tmp_path), train_dataset=Tokens(), dense_steps=2)


def test_manual_switch_then_reused_trainer_raises(tmp_path):
    # plain Trainer: it keeps its optimizer across train() calls; after a manual calibrate
    # that optimizer holds the retired LoRI-D values and must refuse to step
    m = _model()
    t = transformers.Trainer(m, _args(tmp_path, max_steps=2), train_dataset=Tokens())
    t.train()
    m.calibrate()
    with pytest.raises(RuntimeError, match="would train nothing"):
        t.train()
    # LoRITrainer: refused before any step, with what to do
    m = _model()
    t = LoRITrainer(m, _args(tmp_path, max_steps=2), train_dataset=Tokens())
    t.train()
    m.calibrate()
    with pytest.raises(RuntimeError, match="trainer.optimizer = trainer.lr_scheduler = None"):
        t.train()
    t.optimizer = t.lr_scheduler = None
    t.train()
    assert adapter_phase(m, "default") == "sparse"
    assert all(ad.values.abs().sum() > 0 for mod in m.modules() if hasattr(mod, "adapters")
               for ad in mod.adapters.values())


def test_checkpoints_are_adapter_only_and_resume_bit_exact(tmp_path):
    out = tmp_path / "run"
    t = LoRITrainer(_model(), _args(out, save_strategy="steps", save_steps=2),
                    train_dataset=Tokens(), dense_steps=3)
    t.train()
    full = _losses(t)
    final = _values(t.model)
    assert len(full) == 6
    for step, phase in ((2, "dense"), (4, "sparse")):
        ck = out / f"checkpoint-{step}"
        files = set(os.listdir(ck))
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt",
                "scheduler.pt", "rng_state.pth", "trainer_state.json",
                "lori_trainer.json"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}
        assert json.loads((ck / "lori_trainer.json").read_text())["phase"] == phase
        # the adapter file holds B alone (mask / values / offsets per layer), no base weight
        from safetensors import safe_open

        with safe_open(str(ck / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert keys and all(k.rsplit(".", 1)[1] in ("mask", "values", "offsets")
                            for k in keys), keys[:5]
        base_bytes = sum(p.numel() * p.element_size() for p in tiny_llama().parameters())
        assert (ck / "adapter_model.safetensors").stat().st_size < base_bytes
        # resume into a freshly injected LoRI-D model, in each phase
        r = LoRITrainer(_model(), _args(out, save_strategy="steps", save_steps=2),
                        train_dataset=Tokens(), dense_steps=3)
        r.train(resume_from_checkpoint=str(ck))
        got = _losses(r)
        assert {s: got[s] for s in range(step + 1, 7)} == \
            {s: full[s] for s in range(step + 1, 7)}, f"resume from step {step} ({phase})"
        after = _values(r.model)
        assert set(after) == set(final)
        for k in final:
            assert torch.equal(after[k], final[k]), k


def test_resume_refuses_another_switch_step(tmp_path):
    out = tmp_path / "run"
    LoRITrainer(_model(), _args(out, max_steps=4, save_strategy="steps", save_steps=2),
                train_dataset=Tokens(), dense_steps=1).train()
    r = LoRITrainer(_model(), _args(out, max_steps=4), train_dataset=Tokens(), dense_steps=3)
    with pytest.raises(ValueError, match="switched to LoRI-S at step 1"):
        r.train(resume_from_checkpoint=str(out / "checkpoint-2"))


def test_save_model_writes_the_adapter_directory(tmp_path):
    m = get_lori_model(tiny_bert_classifier(), LoRIConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
        sparsity=0.5))

    class Labelled(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"input_ids": torch.randint(0, 64, (10,), generator=g), "labels": i % 3}
    t = LoRITrainer(m, _args(tmp_path / "run", max_steps=4), train_dataset=Labelled(),
                    dense_steps=2)
    t.train()
    out = tmp_path / "adapter"
    t.save_model(str(out))
    assert {"adapter_config.json", "adapter_model.safetensors",
            "modules_to_save.safetensors"} <= set(os.listdir(out))
    x = torch.randint(0, 64, (2, 10))
    m.eval()
    with torch.no_grad():
        want = m(input_ids=x).logits
    loaded = LoRIModel.from_pretrained(tiny_bert_classifier(), str(out))
    with torch.no_grad():
        got = loaded(input_ids=x).logits
    assert torch.equal(got, want)
    assert adapter_phase(loaded, "default") == "sparse"


def _train_curve(tmp_path, **kw):
    t = LoRITrainer(_model(), _args(tmp_path, max_steps=4, **kw), train_dataset=Tokens(),
                    dense_steps=2)
    t.train()
    losses = _losses(t)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert t.lori_phase == "sparse"
    assert all(ad.values.abs().sum() > 0 for mod in t.model.modules() if hasattr(mod, "adapters")
               for ad in mod.adapters.values()), "a layer's LoRI-S values did not train"
    return losses


def test_bf16_autocast(tmp_path):
    bf = _train_curve(tmp_path / "bf", bf16=True)
    fp = _train_curve(tmp_path / "fp")
    # same run in fp32 and under bf16 autocast: bf16's 8 mantissa bits move the loss a little
    assert all(abs(bf[s] - fp[s]) < 0.05 * abs(fp[s]) for s in fp)
    assert bf != fp, "bf16=True changed nothing: autocast was not on"


def test_fp16_with_loss_scaling(tmp_path):
    try:
        args = _args(tmp_path, max_steps=4, fp16=True)
        t = LoRITrainer(_model(), args, train_dataset=Tokens(), dense_steps=2)
    except (ValueError, RuntimeError) as e:
        pytest.skip(f"fp16 mixed precision is not available on this CPU build: {e}")
    if getattr(t.accelerator, "scaler", None) is None:
        pytest.skip("this accelerate build runs fp16 on CPU without a GradScaler")
    t.train()
    assert t.lori_phase == "sparse" and len(_losses(t)) == 4
    assert t.accelerator.scaler.get_scale() > 0
    assert all(ad.values.abs().sum() > 0 for mod in t.model.modules() if hasattr(mod, "adapters")
               for ad in mod.adapters.values())


def test_gradient_accumulation_matches_the_big_batch(tmp_path):
    big = _train_curve(tmp_path / "big", per_device_train_batch_size=4)
    acc = _train_curve(tmp_path / "acc", per_device_train_batch_size=2,
                       gradient_accumulation_steps=2)
    # 2 x 2 accumulated is the batch of 4 (mean loss over equal-length sequences)
    assert all(abs(acc[s] - big[s]) < 1e-4 for s in big)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(tmp_path, reentrant):
    plain = _train_curve(tmp_path / "plain")
    ckpt = _train_curve(tmp_path / "gc", activation_checkpointing=True,
                        activation_checkpointing_kwargs={"use_reentrant": reentrant})
    assert all(abs(ckpt[s] - plain[s]) < 1e-4 for s in plain)


@pytest.mark.slow  # Dynamo compiles the model twice (LoRI-D, then LoRI-S): minutes on 2 cores
def test_torch_compile(tmp_path):
    plain = _train_curve(tmp_path / "plain")
    compiled = _train_curve(tmp_path / "compiled", torch_compile=True)
    assert all(abs(compiled[s] - plain[s]) < 1e-3 for s in plain)

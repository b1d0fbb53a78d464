"""LoRITrainer (lori_kernels.integrations.transformers): both LoRI phases in one train(),
adapter-only checkpoints, bit-exact resume in each phase, save_model, and the Trainer features
a user turns on (mixed precision, accumulation, gradient checkpointing, torch.compile), each
on a tiny Llama for a few steps."""
import json
import math
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


def test_sparse_learning_rate(tmp_path):
    t = LoRITrainer(_model(), _args(tmp_path, max_steps=4, lr_scheduler_type="constant"),
                    train_dataset=Tokens(), dense_steps=2, sparse_learning_rate=3e-2)
    t.train()
    lrs = [h["learning_rate"] for h in t.state.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([1e-2, 1e-2, 3e-2, 3e-2])
    assert {g["lr"] for g in _inner(t.optimizer).param_groups} == {3e-2}
    for bad in (0.0, -1e-3, float("nan"), True, "1e-3"):
        with pytest.raises(ValueError, match="sparse_learning_rate must be"):
            LoRITrainer(_model(), _args(tmp_path), train_dataset=Tokens(), dense_steps=2,
                        sparse_learning_rate=bad)


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


def _cpu_fp16(trainer, init_scale=2.0 ** 16):
    """Make fp16=True real on the CPU, as accelerate makes it on CUDA: autocast on the forward
    (prepare_model wraps it when native_amp is set) and a GradScaler that every prepared
    optimizer, the LoRI-S one included, steps through. accelerate itself creates neither on the
    CPU. Called before train(), which does the preparing."""
    acc = trainer.accelerator
    assert acc.scaler is None and acc.mixed_precision == "fp16"
    acc.native_amp = True
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return acc.scaler


def _inner(opt):
    return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps it


def test_fp16_on_cpu_warns_that_it_trains_fp32(tmp_path):
    with pytest.warns(UserWarning, match="this run trains in fp32"):
        t = LoRITrainer(_model(), _args(tmp_path / "h", max_steps=4, fp16=True),
                        train_dataset=Tokens(), dense_steps=2)
    t.train()
    # the warning's claim: the curve is the fp32 one, bit for bit
    assert _losses(t) == _train_curve(tmp_path / "fp")


def test_fp16_with_loss_scaling_on_cpu(tmp_path):
    m = _model()
    halves = []  # LoRI layers reached by fp16 activations run the LoRI op in fp16
    for mod in m.modules():
        if hasattr(mod, "adapters"):
            mod.register_forward_hook(lambda mod, i, o: halves.append(i[0].dtype == torch.half))
    with pytest.warns(UserWarning, match="trains in fp32"):
        t = LoRITrainer(m, _args(tmp_path / "h", max_steps=4, fp16=True),
                        train_dataset=Tokens(), dense_steps=2)
    scaler = _cpu_fp16(t)
    t.train()
    h = _losses(t)
    fp = _train_curve(tmp_path / "fp")
    assert t.lori_phase == "sparse" and len(h) == 4
    assert any(halves) and not all(halves), "expected fp16 and fp32 inputs among LoRI layers"
    # fp16's 11 mantissa bits move the loss a little; no step overflowed at 2^16
    assert all(abs(h[s] - fp[s]) < 0.02 * abs(fp[s]) for s in fp)
    assert h != fp, "fp16 autocast changed nothing"
    assert scaler.get_scale() == 2.0 ** 16 and int(scaler._growth_tracker) == 4
    assert t.accelerator.scaler is scaler and t.optimizer.scaler is scaler
    assert t.accelerator._optimizers == [t.optimizer], "the LoRI-D optimizer is still prepared"
    assert all(ad.values.abs().sum() > 0 for mod in m.modules() if hasattr(mod, "adapters")
               for ad in mod.adapters.values())


class _Overflowing(LoRITrainer):
    """A loss 2^20 times larger at the 0-based steps in `overflow`: scaled by 2^16 it overflows
    fp16 in the backward pass, so every gradient the scaler checks is inf or nan."""
    overflow = ()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.state.global_step in self.overflow:
            out = (out[0] * 2.0 ** 20,) + tuple(out[1:]) if return_outputs else out * 2.0 ** 20
        return out


def test_fp16_overflow_steps_are_skipped_in_both_phases(tmp_path):
    from transformers import TrainerCallback

    with pytest.warns(UserWarning, match="trains in fp32"):
        t = _Overflowing(_model(), _args(tmp_path, max_steps=6, fp16=True),
                         train_dataset=Tokens(), dense_steps=3)
    t.overflow = (1, 3)  # in LoRI-D, and the first LoRI-S step (the switch)
    scaler = _cpu_fp16(t)
    rows = {}

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.before = (_values(t.model), scaler.get_scale(), scaler)

        def on_step_end(self, args, state, control, **kw):
            opt = _inner(t.optimizer)
            steps = sorted({int(s["step"]) for s in opt.state.values() if "step" in s})
            moments = [m.clone() for s in opt.state.values() for k, m in s.items()
                       if k in ("exp_avg", "exp_avg_sq")]
            rows[state.global_step] = self.before + (_values(t.model), scaler.get_scale(),
                                                     steps, t.lori_phase, moments)
    t.add_callback(Watch())
    t.train()
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for step, (v0, s0, sc0, v1, s1, adam_steps, phase, moments) in rows.items():
        assert sc0 is scaler, "the scaler was replaced"
        assert phase == ("dense" if step <= 3 else "sparse")
        if step == 2:  # overflow in LoRI-D: B and AdamW untouched, scale halved
            assert s1 == s0 / 2 and adam_steps == [1]
            assert v1.keys() == v0.keys() and all(torch.equal(v1[k], v0[k]) for k in v0)
        elif step == 4:  # overflow on the switch: LoRI-S stays at its zero re-initialisation
            assert s1 == s0 / 2 and adam_steps in ([], [0])
            vals = {k: v for k, v in v1.items() if k.endswith(".values")}
            assert vals and all(not v.any() for v in vals.values())
            assert all(not m.any() for m in moments)  # fused AdamW: zeroed state, or none
        else:
            assert s1 == s0 and all(torch.isfinite(v).all() for v in v1.values())
            assert any(not torch.equal(v1[k], v0[k]) for k in v0 if k in v1), step
    assert rows[3][5] == [2] and rows[6][5] == [2]  # AdamW stepped only the good steps
    assert t.accelerator._optimizers == [t.optimizer] and t.optimizer.scaler is scaler
    losses = _losses(t)
    assert all(math.isfinite(losses[s]) for s in (1, 3, 5, 6))
    assert all(ad.values.abs().sum() > 0 for mod in t.model.modules() if hasattr(mod, "adapters")
               for ad in mod.adapters.values())


def test_fp16_resume_restores_the_scaler_bit_exact(tmp_path):
    out = tmp_path / "run"

    def trainer():
        with pytest.warns(UserWarning, match="trains in fp32"):
            t = _Overflowing(_model(), _args(out, fp16=True, save_strategy="steps",
                                             save_steps=2), train_dataset=Tokens(),
                             dense_steps=3)
        t.overflow = (0, 4)
        return t, _cpu_fp16(t)
    t, scaler = trainer()
    t.train()
    full, final, scale = _losses(t), _values(t.model), scaler.get_scale()
    assert scale == 2.0 ** 14
    for step in (2, 4):
        assert (out / f"checkpoint-{step}" / "scaler.pt").is_file()
        r, rscaler = trainer()
        r.train(resume_from_checkpoint=str(out / f"checkpoint-{step}"))
        got = _losses(r)
        assert {s: got[s] for s in range(step + 1, 7)} == \
            {s: full[s] for s in range(step + 1, 7)}, f"resume from step {step}"
        assert rscaler.get_scale() == scale
        after = _values(r.model)
        assert after.keys() == final.keys() and all(torch.equal(after[k], final[k])
                                                     for k in final)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="accelerate creates its own GradScaler only off the CPU (the CPU "
                           "fp16 tests above install one)")
def test_fp16_with_accelerates_scaler_on_cuda(tmp_path):
    t = LoRITrainer(_model(), _args(tmp_path, max_steps=4, fp16=True, use_cpu=False),
                    train_dataset=Tokens(), dense_steps=2)
    scaler = t.accelerator.scaler
    assert scaler is not None
    t.train()
    assert t.lori_phase == "sparse" and len(_losses(t)) == 4
    assert t.accelerator.scaler is scaler and t.optimizer.scaler is scaler
    assert all(ad.values.abs().sum() > 0 for mod in t.model.modules() if hasattr(mod, "adapters")
               for ad in mod.adapters.values())


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_grad_scaler_on_packed_values_cpu_fp16(fused):
    """A manual loop, one LoRI-S layer, fp16 activations under CPU autocast, torch.amp.GradScaler:
    the packed values' gradient arrives scaled and unscale_ returns the fp64 reference's (fp16
    tolerance rule); an overflowing step leaves values and AdamW state bit for bit, halves the
    scale, and the next step trains."""
    from lori_kernels import LoRILinear
    from lori_kernels.packing import pack_bitmask
    from lori_kernels.testing import assert_within_rule, baseline_grads, reference_grads

    g = torch.Generator().manual_seed(0)
    layer = LoRILinear.from_linear(torch.nn.Linear(96, 80), rank=8, alpha=16.0, seed=7)
    layer.base.requires_grad_(False)
    ad = layer.adapters["default"]
    mask = torch.rand(80, 8, generator=g) < 0.25
    ad.set_pattern(mask, 0.1 * torch.randn(80, 8, generator=g))
    x = torch.randn(16, 96, generator=g).half()  # as an fp16 activation from the layer before
    gy = torch.randn(16, 80, generator=g)
    opt = torch.optim.AdamW([ad.values], lr=1e-2, weight_decay=0.0, fused=fused,
                            foreach=None if fused else True)
    # the values' gradient is an fp16 sum over tokens (~1e2 here): a small scale keeps it finite
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 6)

    def backward(mult=1.0):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            y = layer(x)
        assert y.dtype == torch.half
        scaler.scale((y.float() * gy).sum() * mult).backward()

    backward()
    assert ad.values.grad.dtype == torch.float32
    scaled = ad.values.grad.clone()
    scaler.unscale_(opt)
    v0 = ad.values.detach().clone()
    b = pack_bitmask(ad.dense_b().detach().half(), mask=mask)  # what the op read
    _, ref = reference_grads(x, b, ad.seed_op, ad.distribution, ad.scale, gy.half())
    _, base = baseline_grads(x, b, ad.seed_op, ad.distribution, ad.scale, gy.half())
    assert_within_rule(ad.values.grad, ref, base, "unscaled values grad")
    assert torch.equal(scaled, ad.values.grad * 2.0 ** 6)  # a power of two: exact
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 6
    v1 = ad.values.detach().clone()
    st1 = {k: v.clone() for k, v in opt.state[ad.values].items()}
    assert not torch.equal(v1, v0)

    backward(mult=2.0 ** 20)  # 2^26 x the loss: overflows fp16 in the backward pass
    assert not torch.isfinite(ad.values.grad).all()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 5
    assert torch.equal(ad.values.detach(), v1)
    assert all(torch.equal(opt.state[ad.values][k], v) for k, v in st1.items())

    backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 5 and int(opt.state[ad.values]["step"]) == 2
    assert torch.isfinite(ad.values).all() and not torch.equal(ad.values.detach(), v1)


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

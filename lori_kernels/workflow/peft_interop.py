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
from ..nn.linear import check_adapter_name, check_alpha, features, is_adaptable
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
    fan_in_fan_out = False
    for name, layer in lori_layers(model).items():
        if adapter_name not in layer.adapters:
            continue
        fan_in_fan_out |= layer.fan_in_fan_out
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
        # PEFT's one flag for Conv1D layers (it corrects the flag per layer type on load)
        fan_in_fan_out=fan_in_fan_out,
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
    separately saved masks: load_official_masks). With "nonzero", a B that is all zeros (a
    fresh PEFT adapter, init_lora_weights=True) would give a mask with no entry, i.e. nothing
    to train: that is refused when every layer is so (pass masks="dense" to train it as
    LoRI-D) and warned about for the layers that are. Refuses .bin checkpoints (pickle).
    Everything is checked before the model changes."""
    check_adapter_name(adapter_name)
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
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{weights_path}: layer {name!r} is not in the model") from None
        if not (is_adaptable(mod) or isinstance(mod, LoRILinear)):
            raise ValueError(f"{name}: expected an nn.Linear or Conv1D, found "
                             f"{type(mod).__name__}")
        in_f, out_f = features(mod)
        rank = int(_pattern_value(name, cfg.get("rank_pattern"), r0))
        alpha = check_alpha(float(_pattern_value(name, cfg.get("alpha_pattern"), alpha0)),
                            f"{name}: lora_alpha")
        if cfg.get("use_rslora"):  # scale alpha/sqrt(r) == alpha' / r
            alpha = alpha * math.sqrt(rank)
        if a.shape != (rank, in_f) or b.shape != (out_f, rank):
            raise ValueError(f"{name}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the "
                             f"layer ({out_f}, {in_f}) at rank {rank}")
        if isinstance(masks, dict):
            if name not in masks:
                raise ValueError(f"masks has no entry for layer {name!r} (it has "
                                 f"{sorted(masks)[:3]}...)")
            mask = masks[name]
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(b.shape):
                raise ValueError(f"masks[{name!r}] must be a ({out_f}, {rank}) tensor")
            mask = mask.to(torch.bool)
        elif masks == "dense":
            mask = torch.ones(b.shape, dtype=torch.bool)
        elif masks == "nonzero":
            mask = b != 0
        else:
            raise ValueError(f"masks must be 'nonzero', 'dense' or a dict, got {masks!r}")
        if isinstance(mod, LoRILinear) and adapter_name in mod.adapters:
            raise ValueError(f"{name}: adapter {adapter_name!r} already exists")
        plan.append((name, a, b, mask, rank, alpha))
    empty = [p[0] for p in plan if not bool(p[3].any())]
    if empty and masks == "nonzero":
        if len(empty) == len(plan):
            raise ValueError(
                f"{peft_dir}: every lora_B is all zeros (a fresh, untrained PEFT adapter?): "
                "masks='nonzero' would leave nothing to train. Pass masks='dense' to train it "
                "as LoRI-D, or the LoRI masks (load_official_masks)")
        warnings.warn(f"import_peft: lora_B is all zeros in {len(empty)} layers ({empty[:3]}"
                      "...): with masks='nonzero' they get an empty mask and train nothing",
                      stacklevel=2)
    elif empty:
        warnings.warn(f"import_peft: the mask is empty in {len(empty)} layers ({empty[:3]}...): "
                      "they train nothing", stacklevel=2)
    for name, a, b, mask, rank, alpha in plan:
        layer = wrap_linear(model, name)
        ad = layer.add_adapter(adapter_name, rank=rank, alpha=alpha, seed=None,
                               a=a.to(torch.float32), dtype=dtype, activate=activate)
        phase = "dense" if bool(mask.all()) else "sparse"
        ad.set_pattern(mask.cpu(), b.to(torch.float32).cpu(), phase=phase)
        ad.values.requires_grad_(trainable)
    freeze_non_lori(model)
    return model


_OFFICIAL_KEY = re.compile(r"(?:base_model\.model\.)?(.+?)\.lora_B(?:\.[^.]+)?\.weight")


def load_official_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """LoRI's mask file (the official code's torch.save of {PEFT parameter name of lora_B:
    bool (out, rank)}, e.g. "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.
    weight") as {layer name: bool mask}, ready for import_peft(masks=...) or to_sparse.

    Read with torch.load(weights_only=True): tensors and containers only, no code runs (a
    file that needs more is refused). A .safetensors file with the same keys is read too."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        raw = load_file(path)
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler's refusal names what it would have run
            raise ValueError(f"{path}: not a plain tensor dict that loads with "
                             f"weights_only=True ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: expected a non-empty dict of masks, got "
                         f"{type(raw).__name__}")
    masks = {}
    for key, t in raw.items():
        m = _OFFICIAL_KEY.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            raise ValueError(f"{path}: key {key!r} is not a PEFT lora_B parameter name")
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{path}: {key}: expected a 2-D (out, rank) mask")
        if t.dtype != torch.bool:
            if not bool(((t == 0) | (t == 1)).all()):
                raise ValueError(f"{path}: {key}: a {t.dtype} mask must hold only 0 and 1")
            t = t != 0
        if m.group(1) in masks:
            raise ValueError(f"{path}: two masks for layer {m.group(1)!r}")
        masks[m.group(1)] = t
    return masks

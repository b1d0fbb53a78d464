"""Putting LoRI adapters into a model, finding them, freezing them, counting them."""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch
from torch import nn

from .. import spec
from ..nn import DEFAULT_ADAPTER, LoRILinear


def progress_bar(iterable, *, desc: str, disable: bool, **kw):
    """tqdm when installed (and not disabled), else the iterable itself."""
    if disable:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, desc=desc, **kw)


def _matches(name: str, target_modules: str | Iterable[str]) -> bool:
    """PEFT's rule: a str is a regex that must match the whole name; a list matches a name equal
    to an entry or ending in '.' + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def lori_layers(model: nn.Module) -> dict[str, LoRILinear]:
    """{qualified name: LoRILinear} in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRILinear)}


def resolve_adapter(model: nn.Module, adapter_name: str | None) -> str:
    """`adapter_name`, or (None) the model's only adapter name, else "default"."""
    if adapter_name is not None:
        return adapter_name
    names = {n for layer in lori_layers(model).values() for n in layer.adapters}
    return names.pop() if len(names) == 1 else DEFAULT_ADAPTER


def wrap_linear(model: nn.Module, name: str) -> LoRILinear:
    """The LoRILinear at `name`, wrapping the nn.Linear there first if needed."""
    mod = model.get_submodule(name)
    if isinstance(mod, LoRILinear):
        return mod
    if not isinstance(mod, nn.Linear):
        raise TypeError(f"{name}: LoRI adapts nn.Linear layers, found {type(mod).__name__}")
    layer = LoRILinear(mod)
    _set_submodule(model, name, layer)
    return layer


def inject(model: nn.Module, target_modules: str | Sequence[str], *, rank: int, alpha: float,
           seed: int, distribution: str = spec.DEFAULT_DISTRIBUTION,
           adapter_name: str = DEFAULT_ADAPTER, dtype: torch.dtype = torch.float32,
           freeze_base: bool = True) -> nn.Module:
    """Add a LoRI-D adapter to every nn.Linear whose name matches `target_modules` (PEFT's
    matching rule; e.g. ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
    "down_proj"], or MiniLM's ["query", "key", "value", "dense"]). Layer `name` gets
    A's seed spec.layer_seed(seed, name). Layers already wrapped get one more adapter.
    `freeze_base` sets requires_grad=False on every parameter that is not a LoRI value.
    Returns the model (modified in place)."""
    spec.check_seed(seed)
    names = [n for n, m in model.named_modules()
             if n and _matches(n, target_modules) and isinstance(m, (nn.Linear, LoRILinear))
             and not _inside_lori(model, n)]
    if not names:
        raise ValueError(f"no nn.Linear in the model matches target_modules={target_modules!r}")
    for name in names:
        layer = wrap_linear(model, name)
        ad = layer.add_adapter(adapter_name, rank=rank, alpha=alpha,
                               seed=spec.layer_seed(seed, name), distribution=distribution,
                               dtype=dtype)
        ad.adapter_seed = int(seed)
    if freeze_base:
        freeze_non_lori(model)
    return model


def freeze_non_lori(model: nn.Module) -> None:
    """requires_grad=False on every parameter that is not a LoRI adapter's values."""
    for pname, p in model.named_parameters():
        if not _is_lori_value(pname):
            p.requires_grad_(False)


def _inside_lori(model: nn.Module, name: str) -> bool:
    """True for modules inside a LoRILinear (its base): never wrap those again."""
    parts = name.split(".")
    return any(isinstance(model.get_submodule(".".join(parts[:i])), LoRILinear)
               for i in range(1, len(parts)))


def _is_lori_value(param_name: str) -> bool:
    return ".adapters." in "." + param_name and param_name.endswith(".values")


def set_active(model: nn.Module, names: str | Sequence[str],
               weights: Sequence[float] | None = None) -> None:
    """Every LoRI layer: activate `names` (those the layer has) with PEFT-style weights."""
    names = [names] if isinstance(names, str) else list(names)
    weights = [1.0] * len(names) if weights is None else list(weights)
    for layer in lori_layers(model).values():
        keep = [(n, w) for n, w in zip(names, weights) if n in layer.adapters]
        layer.set_active([n for n, _ in keep], [w for _, w in keep])


def freeze_adapter(model: nn.Module, adapter_name: str, frozen: bool = True) -> None:
    for layer in lori_layers(model).values():
        if adapter_name in layer.adapters:
            layer.adapters[adapter_name].values.requires_grad_(not frozen)


def add_task_adapter(model: nn.Module, adapter_name: str, *, share_a_with: str | None = None,
                     rank: int | None = None, alpha: float | None = None,
                     seed: int | None = None, distribution: str | None = None,
                     masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Continual learning: freeze every adapter already in the model and add a new trainable
    one on the same layers, active together with the old ones.

    share_a_with=<old adapter>: the new adapter reuses the old one's A (same per-layer seeds,
    rank, distribution), as LoRI's continual-learning recipe keeps the safety adapter's A;
    otherwise pass rank/alpha/seed for fresh A's. `masks` ({layer name: bool (out, rank)}): the
    new task's mask, giving a LoRI-S adapter at once (zeros on the mask); without it the
    adapter starts in LoRI-D (calibrate_masks(..., adapter_name=...) later)."""
    layers = lori_layers(model)
    if not layers:
        raise ValueError("the model has no LoRI layers: load or inject an adapter first")
    for name, layer in layers.items():
        for ad in layer.adapters.values():
            ad.values.requires_grad_(False)
        if share_a_with is not None:
            if share_a_with not in layer.adapters:
                continue
            old = layer.adapters[share_a_with]
            ad = layer.add_adapter(adapter_name, rank=old.rank,
                                   alpha=old.alpha if alpha is None else alpha, seed=old.seed,
                                   distribution=old.distribution, dtype=old.values.dtype,
                                   a=old.a)
            ad.adapter_seed = getattr(old, "adapter_seed", None)
        else:
            if rank is None or alpha is None or seed is None:
                raise ValueError("rank, alpha and seed are needed without share_a_with")
            ad = layer.add_adapter(adapter_name, rank=rank, alpha=alpha,
                                   seed=spec.layer_seed(seed, name),
                                   distribution=distribution or spec.DEFAULT_DISTRIBUTION)
            ad.adapter_seed = int(seed)
        if masks is not None:
            ad.set_pattern(masks[name].to(torch.bool), None, phase="sparse")
    freeze_non_lori(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every LoRILinear by its base nn.Linear (unmerging first if merged): the plain
    model back, e.g. to hand to PEFT."""
    for name, layer in lori_layers(model).items():
        if layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base)
    return model


def adapter_stats(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER,
                  optimizer_states: int = 2) -> dict[str, int]:
    """Counts for one adapter: trainable values, B's dense size, LoRA's A+B at the same rank,
    and optimizer-state bytes (`optimizer_states` fp32 tensors per parameter; AdamW: 2)."""
    values = dense_b = lora = 0
    for layer in lori_layers(model).values():
        if adapter_name not in layer.adapters:
            continue
        ad = layer.adapters[adapter_name]
        values += ad.nnz
        dense_b += ad.out_features * ad.rank
        lora += ad.rank * (ad.in_features + ad.out_features)
    return {"trainable": values, "dense_b": dense_b, "lora": lora,
            "optimizer_bytes": values * 4 * optimizer_states,
            "lora_optimizer_bytes": lora * 4 * optimizer_states}

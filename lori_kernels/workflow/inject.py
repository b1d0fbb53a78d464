"""Putting LoRI adapters into a model, finding them, freezing them, counting them."""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch
from torch import nn

from .. import spec
from ..nn import DEFAULT_ADAPTER, LoRILinear
from ..nn.linear import check_adapter_name, check_alpha, is_adaptable


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
    if not name:
        raise ValueError("layer name '' is the root module itself: wrap the layer in a "
                         "container module (e.g. nn.Sequential) to adapt it")
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# Wrappers that hold the model as one child: DDP / DataParallel (`module`), torch.compile
# (`_orig_mod`), FSDP1 and activation checkpointing. Their child's name is not part of the
# layer's identity: seeds and adapter files use names with it left out, so that injecting
# after wrapping gives the same A's and files as on the plain model.
_WRAPPER_CHILD = {"DistributedDataParallel": "module", "DataParallel": "module",
                  "OptimizedModule": "_orig_mod",
                  "FullyShardedDataParallel": "_fsdp_wrapped_module",
                  "CheckpointWrapper": "_checkpoint_wrapped_module",
                  "OffloadWrapper": "_checkpoint_wrapped_module"}


def canonical_name(model: nn.Module, name: str) -> str:
    """`name` (a path in `model`) without the children that wrappers insert: the layer's name in
    the plain model ("module._orig_mod.layers.0.q" -> "layers.0.q")."""
    out, cur = [], model
    for part in name.split(".") if name else []:
        if _WRAPPER_CHILD.get(type(cur).__name__) != part:
            out.append(part)
        cur = cur._modules[part] if cur is not None and part in cur._modules else None
    return ".".join(out)


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
    if not name:
        raise ValueError("layer name '' is the root module itself: wrap the layer in a "
                         "container module (e.g. nn.Sequential) to adapt it")
    mod = model.get_submodule(name)
    if isinstance(mod, LoRILinear):
        return mod
    if not is_adaptable(mod):
        raise TypeError(f"{name}: LoRI adapts nn.Linear and transformers Conv1D layers, found "
                        f"{type(mod).__name__}")
    layer = LoRILinear(mod)
    _set_submodule(model, name, layer)
    return layer


def inject(model: nn.Module, target_modules: str | Sequence[str], *, rank: int, alpha: float,
           seed: int, distribution: str = spec.DEFAULT_DISTRIBUTION,
           adapter_name: str = DEFAULT_ADAPTER, dtype: torch.dtype = torch.float32,
           freeze_base: bool = True) -> nn.Module:
    """Add a LoRI-D adapter to every nn.Linear (or transformers Conv1D) whose name matches
    `target_modules` (PEFT's matching rule; e.g. ["q_proj", "k_proj", "v_proj", "o_proj",
    "gate_proj", "up_proj", "down_proj"], MiniLM's ["query", "key", "value", "dense"], GPT-2's
    ["c_attn", "c_proj", "c_fc"]). Layer `name` gets A's seed spec.layer_seed(seed, name).
    Works on a model on the meta device (the adapters are created there too; see
    LoRIModel.load_base_weights).

    The new adapter becomes the active one and the only trainable one: on a model that already
    has adapters, every layer switches to `adapter_name` (layers without it apply none) and the
    other adapters are frozen. (add_task_adapter keeps old adapters active; set_active and
    combine_adapters choose other combinations.) `freeze_base` sets requires_grad=False on
    every parameter that is not a LoRI value. Returns the model (modified in place)."""
    names = target_layer_names(model, target_modules)
    add_adapters(model, names, adapter_name=adapter_name, rank=rank, alpha=alpha, seed=seed,
                 distribution=distribution, dtype=dtype)
    if freeze_base:
        freeze_non_lori(model)
    return model


def target_layer_names(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the adaptable layers (nn.Linear, Conv1D, or already LoRILinear) matching
    `target_modules`; ValueError if none does."""
    names = [n for n, m in model.named_modules()
             if n and _matches(n, target_modules) and (is_adaptable(m) or isinstance(
                 m, LoRILinear)) and not _inside_lori(model, n)]
    if not names:
        raise ValueError(f"no nn.Linear or Conv1D in the model matches "
                         f"target_modules={target_modules!r}")
    return names


def add_adapters(model: nn.Module, names: Sequence[str], *, adapter_name: str,
                 rank: int | dict[str, int], alpha: float | dict[str, float], seed: int,
                 distribution: str = spec.DEFAULT_DISTRIBUTION,
                 dtype: torch.dtype = torch.float32, activate: bool = True) -> None:
    """Add a LoRI-D adapter `adapter_name` to the layers `names` (rank/alpha: one value or one
    per name). Everything is checked before the model changes. activate=True: it becomes the
    model's only active and trainable adapter; False: it is added frozen and inactive."""
    check_adapter_name(adapter_name)
    spec.check_seed(seed)
    spec.check_distribution(distribution)
    ranks = rank if isinstance(rank, dict) else dict.fromkeys(names, rank)
    alphas = alpha if isinstance(alpha, dict) else dict.fromkeys(names, alpha)
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, LoRILinear) and adapter_name in mod.adapters:
            raise ValueError(f"{name}: adapter {adapter_name!r} already exists")
        if not (is_adaptable(mod) or isinstance(mod, LoRILinear)):
            raise TypeError(f"{name}: LoRI adapts nn.Linear and transformers Conv1D layers, "
                            f"found {type(mod).__name__}")
        if not name:
            raise ValueError("layer name '' is the root module itself: wrap the layer in a "
                             "container module (e.g. nn.Sequential) to adapt it")
        r = ranks[name]
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= spec.MAX_RANK:
            raise ValueError(f"rank for {name} must be an int in [1, {spec.MAX_RANK}], got {r!r}")
        check_alpha(alphas[name], f"alpha for {name}")
    for name in names:
        layer = wrap_linear(model, name)
        ad = layer.add_adapter(adapter_name, rank=ranks[name], alpha=alphas[name],
                               seed=spec.layer_seed(seed, canonical_name(model, name)),
                               distribution=distribution, dtype=dtype, activate=False)
        ad.adapter_seed = int(seed)
        ad.values.requires_grad_(activate)
    if activate:
        set_active(model, adapter_name)
        for layer in lori_layers(model).values():
            for n, other in layer.adapters.items():
                if n != adapter_name:
                    other.values.requires_grad_(False)


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
                                   seed=spec.layer_seed(seed, canonical_name(model, name)),
                                   distribution=distribution or spec.DEFAULT_DISTRIBUTION)
            ad.adapter_seed = int(seed)
        if masks is not None:
            ad.set_pattern(masks[name].to(torch.bool), None, phase="sparse")
    freeze_non_lori(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every LoRILinear by its base layer, without the adapters: the plain model back,
    e.g. to hand to PEFT. A merged model is refused (unwrapping would either keep the merged
    weights or silently drop them): call merge_and_unload(model) to keep them, or
    unmerge(model) first."""
    merged = [n for n, layer in lori_layers(model).items() if layer.merged]
    if merged:
        raise ValueError(f"unwrap: {len(merged)} layers are merged ({merged[:3]}...): call "
                         "merge_and_unload(model) to keep the merged weights, or "
                         "unmerge(model) first to get the base model back")
    for name, layer in lori_layers(model).items():
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

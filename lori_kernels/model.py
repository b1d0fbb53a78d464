"""The model layer: get_lori_model(model, LoRIConfig) -> LoRIModel, PEFT's habits for LoRI.

LoRIModel wraps a model whose target layers it replaced by LoRILinear (lori_kernels.nn); the
workflow functions (lori_kernels.workflow) do the work underneath. Forward, generate and any
attribute reach the wrapped model. An adapter directory is adapter_config.json (the
LoRIConfig plus a record of the base: name, revision, every adapted layer's shape and a
fingerprint of its weight) + adapter_model.safetensors (the compact LoRI file,
lori_kernels/workflow/format.py) + modules_to_save.safetensors when there are such modules.
Nothing is ever unpickled.

The LoRI phases: `calibrate()` (or `to_sparse(masks)`) switches an adapter from LoRI-D to
LoRI-S, which replaces its values Parameters. Both return a PhaseSwitch naming the new
Parameters; an optimizer built before the switch raises at its next step() (the old
Parameters are retired, lori_kernels.nn.linear.retire_parameter) instead of silently training
nothing.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from . import spec
from .config import CONFIG_NAME, LoRIConfig, read_config_json
from .nn import LoRILinear
from .nn.linear import check_adapter_name, features, is_adaptable
from .workflow import io as _io
from .workflow.calibrate import calibrate_masks, to_sparse
from .workflow.inject import (_inside_lori, _matches, _set_submodule, add_adapters,
                              freeze_non_lori, lori_layers, set_active, target_layer_names,
                              unwrap)
from .workflow.merge import COMBINATIONS, combine_adapters, merge, merge_and_unload, unmerge

MODULES_TO_SAVE_NAME = "modules_to_save.safetensors"
RECORD_VERSION = 1


@dataclass
class PhaseSwitch:
    """What a LoRI-D -> LoRI-S switch changed, i.e. what must be rebuilt: the optimizer and its
    LR scheduler over `new_parameters` (and any DDP / FSDP / compiled wrapper of the model)."""
    adapter_name: str
    phase: str
    masks: dict[str, torch.Tensor]
    new_parameters: list[nn.Parameter] = field(repr=False)
    trainable: int = 0
    rebuild: tuple[str, ...] = ("optimizer", "lr_scheduler")


class ModulesToSave(nn.Module):
    """A module trained in full with an adapter (e.g. a classifier head): the original stays
    frozen and each adapter has its own trainable copy; the forward uses the active adapter's
    copy, or the original when none (disable_adapter) or the adapter has no copy. PEFT's
    ModulesToSaveWrapper, with the same state-dict names."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        original.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None

    def add(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def current(self) -> nn.Module:
        if self.active is not None and self.active in self.modules_to_save:
            return self.modules_to_save[self.active]
        return self.original_module

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.current(), name)


def _modules_to_save(model: nn.Module) -> dict[str, ModulesToSave]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSave)}


def _fingerprint(layer: nn.Module) -> list[float] | None:
    """Three numbers of a base weight (in (out, in) orientation): its RMS and the sums of its
    first row and first column. Enough to tell a different base of the same architecture
    apart; tolerant of a dtype cast."""
    w = layer.weight
    if w.is_meta:
        return None
    w = w.detach()
    if hasattr(w, "full_tensor"):  # FSDP2 / DTensor shard: the whole weight's numbers
        w = w.full_tensor()
    if is_adaptable(layer) and not isinstance(layer, nn.Linear):  # Conv1D: (in, out)
        w = w.T
    w = w.double()
    return [float(w.pow(2).mean().sqrt()), float(w[0].sum()), float(w[:, 0].sum())]


def _fingerprints_match(a: list[float], b: list[float], in_f: int, out_f: int) -> bool:
    """Rounding to bf16 moves each entry by ~0.4%, so a row sum by ~0.004 rms sqrt(n); another
    weight of the same scale moves it by ~rms sqrt(n). The tolerance sits between."""
    rms = max(a[0], 1e-12)
    return math.isclose(a[0], b[0], rel_tol=2e-2) and \
        abs(a[1] - b[1]) <= 0.05 * rms * math.sqrt(in_f) and \
        abs(a[2] - b[2]) <= 0.05 * rms * math.sqrt(out_f)


def _base_name(model: nn.Module) -> tuple[str | None, str | None]:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
    revision = getattr(cfg, "_commit_hash", None)
    return (name or None), (revision or None)


def _target_names(model: nn.Module, config: LoRIConfig, saved: list[str]) -> list[str]:
    saved = list(_modules_to_save(model)) + list(saved)
    inside_saved = lambda n: any(n == s or n.startswith(s + ".") for s in saved)  # noqa: E731
    if config.target_modules == "all-linear":
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") \
            else None
        names = [n for n, m in model.named_modules()
                 if n and (is_adaptable(m) or isinstance(m, LoRILinear)) and m is not out_emb
                 and not _inside_lori(model, n)]
    else:
        names = target_layer_names(model, config.target_modules)
    names = [n for n in names if config.transforms_layer_index(n) and not inside_saved(n)]
    if not names:
        raise ValueError(f"LoRIConfig.target_modules={config.target_modules!r} (with "
                         f"layers_to_transform={config.layers_to_transform!r}) matches no "
                         "nn.Linear or Conv1D layer of the model")
    return names


def _saved_names(model: nn.Module, config: LoRIConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, m in model.named_modules()
             if n and _matches(n, config.modules_to_save) and
             not isinstance(m, LoRILinear) and not _inside_lori(model, n) and
             ".modules_to_save." not in f".{n}." and ".original_module" not in f".{n}."]
    if not names:
        raise ValueError(f"LoRIConfig.modules_to_save={config.modules_to_save!r} matches no "
                         "module of the model")
    return names


def get_lori_model(model: nn.Module, config: LoRIConfig, adapter_name: str = "default"
                   ) -> "LoRIModel":
    """Put a LoRI-D adapter `adapter_name` into `model` as `config` says and wrap it (PEFT's
    get_peft_model). The base is frozen; the adapter's B values (and its modules_to_save
    copies) are the only trainable parameters. Works on a model on the meta device: load the
    base weights afterwards with LoRIModel.load_base_weights."""
    if isinstance(model, LoRIModel):
        raise ValueError("the model is already a LoRIModel: use its add_adapter")
    if not isinstance(config, LoRIConfig):
        raise ValueError(f"config must be a LoRIConfig, got {type(config).__name__}")
    lori = LoRIModel(model)
    lori.add_adapter(adapter_name, config)
    lori.set_adapter(adapter_name)
    return lori


class LoRIModel(nn.Module):
    """A model with LoRI adapters (PEFT's PeftModel for LoRI). Build it with get_lori_model or
    LoRIModel.from_pretrained. `base_model` is the wrapped model (its adapted layers replaced
    by LoRILinear); `peft_config` {adapter name: LoRIConfig}; `active_adapters`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, LoRIConfig] = {}
        self.active_adapters: list[str] = []
        self._trainable: dict[str, bool] = {}
        self._combined: dict[str, tuple[list[str], list[float], str]] = {}
        self._disabled = False
        self._bind_forward()

    # ---- pass-through ----
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def _bind_forward(self) -> None:
        # Tools read the forward's signature to pick inputs (Trainer drops every dataset
        # column forward does not name): a per-instance forward whose __wrapped__ is the
        # base's, so inspect.signature(lori_model.forward) is the wrapped model's.
        def forward(self, *args, **kwargs):
            return self.base_model(*args, **kwargs)

        forward.__wrapped__ = type(self.base_model).forward
        forward.__doc__ = LoRIModel.forward.__doc__
        self.forward = types.MethodType(forward, self)

    def __getstate__(self):
        # the bound per-instance forward is rebuilt, not pickled or deep-copied
        state = self.__dict__.copy()
        state.pop("forward", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._bind_forward()

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0] if len(self.active_adapters) == 1 else \
            ",".join(self.active_adapters)

    # ---- adapters ----
    def add_adapter(self, adapter_name: str, config: LoRIConfig) -> None:
        """Inject one more LoRI-D adapter (frozen and inactive until set_adapter, as PEFT)."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config or adapter_name in self._combined:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if self.merged:
            raise ValueError("add_adapter: the model is merged; unmerge_adapter() first")
        saved = _saved_names(self.base_model, config)
        names = _target_names(self.base_model, config, saved)
        config = copy.deepcopy(config)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path, rev = _base_name(self.base_model)
            config.revision = config.revision or rev
        add_adapters(self.base_model, names, adapter_name=adapter_name,
                             rank={n: config.rank_for(n) for n in names},
                             alpha={n: config.alpha_for(n) for n in names}, seed=config.seed,
                             distribution=config.distribution, activate=False)
        self._wrap_saved(saved, adapter_name)
        freeze_non_lori(self.base_model)
        self.peft_config[adapter_name] = config
        self._trainable[adapter_name] = not config.inference_mode
        self._apply_trainable()

    def _wrap_saved(self, names: list[str], adapter_name: str) -> None:
        for n in names:
            mod = self.base_model.get_submodule(n)
            if not isinstance(mod, ModulesToSave):
                mod = ModulesToSave(mod)
                _set_submodule(self.base_model, n, mod)
            mod.add(adapter_name)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make `adapter_name` (or several: their deltas add up, PEFT's mixed adapters) the
        active adapter(s); only active adapters are trainable (unless loaded for inference).
        A name from add_weighted_adapter activates that combination."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise ValueError("set_adapter: give at least one adapter name")
        for n in names:
            if n not in self.peft_config and n not in self._combined:
                raise ValueError(f"no adapter {n!r} (adapters: {self.adapter_names})")
        if self.merged:
            raise ValueError("set_adapter: the model is merged; unmerge_adapter() first")
        if len(names) == 1 and names[0] in self._combined:
            parts, weights, combination = self._combined[names[0]]
            combine_adapters(self.base_model, parts, weights, combination=combination)
        elif any(n in self._combined for n in names):
            raise ValueError("a combined adapter (add_weighted_adapter) is activated alone")
        else:
            set_active(self.base_model, names)
        for m in _modules_to_save(self.base_model).values():
            m.active = next((n for n in names if n in m.modules_to_save), None)
        self.active_adapters = names
        self._apply_trainable()

    def _apply_trainable(self) -> None:
        active = set(self.active_adapters)
        for layer in lori_layers(self.base_model).values():
            for n, ad in layer.adapters.items():
                ad.values.requires_grad_(n in active and self._trainable.get(n, False))
        for m in _modules_to_save(self.base_model).values():
            for n, copy_ in m.modules_to_save.items():
                copy_.requires_grad_(n in active and self._trainable.get(n, False))

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere (layers left without adapters get their base layer
        back). The last adapter cannot be deleted: use unload()."""
        if adapter_name in self._combined:
            del self._combined[adapter_name]
            if self.active_adapters == [adapter_name]:
                self.set_adapter(next(iter(self.peft_config)))
            return
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter {adapter_name!r} (adapters: {self.adapter_names})")
        if len(self.peft_config) == 1:
            raise ValueError("delete_adapter: it is the last adapter; use unload() to get the "
                             "base model back")
        if self.merged:
            raise ValueError("delete_adapter: the model is merged; unmerge_adapter() first")
        for name, layer in lori_layers(self.base_model).items():
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
                if not layer.adapters:
                    _set_submodule(self.base_model, name, layer.base)
        for name, m in _modules_to_save(self.base_model).items():
            if adapter_name in m.modules_to_save:
                del m.modules_to_save[adapter_name]
                if not len(m.modules_to_save):
                    _set_submodule(self.base_model, name, m.original_module)
        del self.peft_config[adapter_name]
        self._trainable.pop(adapter_name, None)
        self._combined = {k: v for k, v in self._combined.items() if adapter_name not in v[0]}
        remaining = [n for n in self.active_adapters if n != adapter_name]
        self.set_adapter(remaining or next(iter(self.peft_config)))

    @property
    def adapter_names(self) -> list[str]:
        return list(self.peft_config) + list(self._combined)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float],
                             adapter_name: str, combination_type: str = "cat") -> None:
        """A weighted combination of adapters under a new name (PEFT's add_weighted_adapter,
        "cat" or "linear"; exact, no A is materialised). It is evaluated as the sum of its
        parts' terms; set_adapter(adapter_name) activates it. It has no B of its own: save
        its parts, or merge_and_unload it."""
        check_adapter_name(adapter_name)
        if adapter_name in self.adapter_names:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if combination_type not in COMBINATIONS:
            raise ValueError(f"combination_type must be one of {COMBINATIONS}, got "
                             f"{combination_type!r}")
        missing = [a for a in adapters if a not in self.peft_config]
        if missing or len(adapters) != len(weights) or not adapters:
            raise ValueError(f"adapters must be existing adapters with one weight each "
                             f"(unknown: {missing})")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"weights must be finite numbers, got {w!r}")
        self._combined[adapter_name] = (list(adapters), [float(w) for w in weights],
                                        combination_type)

    # ---- counting ----
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # ---- the LoRI phases ----
    def calibrate(self, sparsity: float | None = None, scope: str | None = None, *,
                  init: str | None = None, adapter_name: str | None = None,
                  progress: bool | None = None) -> PhaseSwitch:
        """End LoRI-D: the mask from |B| (LoRI's top-k rule; sparsity, scope and init default
        to the adapter's LoRIConfig) and the switch to LoRI-S. Build the optimizer and
        scheduler again over the returned new_parameters."""
        name = self._phase_adapter(adapter_name)
        cfg = self.peft_config[name]
        masks = calibrate_masks(
            self.base_model, cfg.sparsity if sparsity is None else sparsity,
            cfg.mask_scope if scope is None else scope, adapter_name=name, apply=False,
            progress=progress)
        return self.to_sparse(masks, init=init, adapter_name=name)

    def to_sparse(self, masks: dict[str, torch.Tensor], *, init: str | None = None,
                  adapter_name: str | None = None) -> PhaseSwitch:
        """Switch the adapter to LoRI-S on `masks` ({layer name: bool (out, rank)}, e.g. from
        load_official_masks). Returns the PhaseSwitch (the new Parameters to optimize)."""
        name = self._phase_adapter(adapter_name)
        init = self.peft_config[name].sparse_init if init is None else init
        new = to_sparse(self.base_model, masks, adapter_name=name, init=init)
        self._apply_trainable()
        return PhaseSwitch(name, "sparse", masks, new, sum(p.numel() for p in new))

    def _phase_adapter(self, adapter_name: str | None) -> str:
        name = adapter_name or (self.active_adapters[0] if len(self.active_adapters) == 1
                                else None)
        if name is None or name not in self.peft_config:
            raise ValueError(f"adapter_name: give one LoRI adapter (adapters: "
                             f"{list(self.peft_config)})")
        if self.merged:
            raise ValueError("the model is merged; unmerge_adapter() first")
        return name

    # ---- merging and unloading ----
    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in lori_layers(self.base_model).values())

    def merge_adapter(self) -> None:
        merge(self.base_model)

    def unmerge_adapter(self) -> None:
        unmerge(self.base_model)

    def merge_and_unload(self, progress: bool = False) -> nn.Module:
        """Fold the active adapter(s) into the base weights and return the plain base model
        with those merged weights (modules_to_save: the active copy takes the original's
        place). This LoRIModel is spent afterwards."""
        merge_and_unload(self.base_model, progress=progress)
        return self._unwrap_saved(keep_copy=True)

    def unload(self) -> nn.Module:
        """The base model without any adapter (unmerged if merged), as it was."""
        unmerge(self.base_model)
        unwrap(self.base_model)
        return self._unwrap_saved(keep_copy=False)

    def _unwrap_saved(self, keep_copy: bool) -> nn.Module:
        for name, m in _modules_to_save(self.base_model).items():
            _set_submodule(self.base_model, name, m.current() if keep_copy
                                   else m.original_module)
        model = self.base_model
        self.peft_config, self.active_adapters = {}, []
        return model

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model is its base (no adapter delta, modules_to_save use their
        originals); the adapters come back on exit, also after an exception."""
        if self.merged:
            raise ValueError("disable_adapter: the model is merged; unmerge_adapter() first")
        layers = lori_layers(self.base_model)
        saved = {n: layer.terms for n, layer in layers.items()}
        mts = {n: m.active for n, m in _modules_to_save(self.base_model).items()}
        try:
            for layer in layers.values():
                layer.set_terms(())
            for m in _modules_to_save(self.base_model).values():
                m.active = None
            self._disabled = True
            yield
        finally:
            self._disabled = False
            for n, layer in layers.items():
                layer.set_terms(saved[n])
            for n, m in _modules_to_save(self.base_model).items():
                m.active = mts.get(n)

    # ---- state dicts ----
    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's entries of state_dict() only (B values, mask, offsets, the recipe,
        modules_to_save copies): a small checkpoint (e.g. for Trainer) that
        set_adapter_state_dict or load_state_dict(strict=False) takes back."""
        name = adapter_name or self._phase_adapter(None)
        if name not in self.peft_config:
            raise ValueError(f"no adapter {name!r}")
        keys = (f".adapters.{name}.", f".modules_to_save.{name}.")
        return {k: v for k, v in self.state_dict().items() if any(s in k for s in keys)}

    def set_adapter_state_dict(self, state_dict: dict[str, torch.Tensor],
                               adapter_name: str | None = None) -> PhaseSwitch | None:
        """Load get_adapter_state_dict's output back, all or nothing: every key must be one of
        the adapter's and all must be there, each recipe must match, B's packing must be
        consistent. A state in another phase (LoRI-S into a LoRI-D model) switches the
        structure; the PhaseSwitch returned then names the new Parameters (None otherwise)."""
        name = adapter_name or self._phase_adapter(None)
        expected = set(self.get_adapter_state_dict(name))
        unexpected = sorted(set(state_dict) - expected)
        missing = sorted(expected - set(state_dict))
        if unexpected or missing:
            raise ValueError(f"state_dict: not adapter {name!r}'s entries (unexpected "
                             f"{unexpected[:3]}, missing {missing[:3]})")
        before = list(self.parameters())  # kept alive, so that ids stay unique
        ids = {id(p) for p in before}
        self.load_state_dict(state_dict, strict=False)
        new = [p for p in self.parameters() if id(p) not in ids]
        del before
        self._apply_trainable()
        if not new:
            return None
        return PhaseSwitch(name, "sparse", {}, new, sum(p.numel() for p in new))

    def check_state_dict(self, state_dict: dict, prefix: str = "") -> None:
        """Everything load_state_dict would take from `state_dict`, checked without changing
        the model: LoRI recipes and packing (see LoRIAdapter.check_state), and the shape of
        every other entry. ValueError naming the key."""
        own = self.state_dict(keep_vars=True)
        lori_keys = set()
        for lname, layer in lori_layers(self.base_model).items():
            for aname, ad in layer.adapters.items():
                p = f"{prefix}base_model.{lname}.adapters.{aname}."
                ad.check_state(state_dict, p)
                lori_keys |= {p + k for k in ("values", "mask", "offsets", "_extra_state")}
        for k, v in state_dict.items():
            if k in lori_keys or k not in own:
                continue
            mine = own[k]
            if isinstance(mine, torch.Tensor) and isinstance(v, torch.Tensor) and \
                    tuple(mine.shape) != tuple(v.shape):
                raise ValueError(f"{k}: shape {tuple(v.shape)} in the state dict, "
                                 f"{tuple(mine.shape)} in the model")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module.load_state_dict, but all or nothing: check_state_dict (and, with strict,
        the key sets) before anything is copied."""
        self.check_state_dict(state_dict)
        if strict:
            own = set(self.state_dict())
            missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
            if missing or unexpected:
                raise ValueError(f"load_state_dict: missing keys {missing[:5]}, unexpected "
                                 f"keys {unexpected[:5]}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_base_weights(self, state_dict: dict[str, torch.Tensor], strict: bool = True
                          ) -> None:
        """Load the plain base model's weights (keys as in the model before injection, e.g. a
        checkpoint's state dict) into the injected model, e.g. one built on the meta device:
        `<layer>.weight` goes to `<layer>.base.weight`, a modules_to_save module's to its
        original and every copy. Fresh LoRI-D adapters still on the meta device are then made
        real (B zeros) next to their base weight. Shapes are checked first."""
        lori = lori_layers(self.base_model)
        saved = _modules_to_save(self.base_model)
        mapped = {}
        for k, v in state_dict.items():
            owner = k.rpartition(".")[0]
            sub = k.rpartition(".")[2]
            holder = next((s for s in saved if owner == s or owner.startswith(s + ".")), None)
            if owner in lori:
                mapped[f"{owner}.base.{sub}"] = v
            elif holder is not None:
                rest = k[len(holder) + 1:]
                mapped[f"{holder}.original_module.{rest}"] = v
                for a in saved[holder].modules_to_save:
                    mapped[f"{holder}.modules_to_save.{a}.{rest}"] = v.clone()
            else:
                mapped[k] = v
        own = self.base_model.state_dict(keep_vars=True)
        for k, v in mapped.items():
            if k not in own:
                if strict:
                    raise ValueError(f"load_base_weights: {k!r} is not a weight of the model")
                continue
            if tuple(own[k].shape) != tuple(v.shape):
                raise ValueError(f"load_base_weights: {k}: shape {tuple(v.shape)}, the model "
                                 f"has {tuple(own[k].shape)}")
        base_keys = {k for k in own if ".adapters." not in k}
        absent = sorted(base_keys - set(mapped))
        if strict and absent:
            raise ValueError(f"load_base_weights: missing base weights {absent[:5]}")
        # what would stay on the meta device: non-persistent buffers (e.g. rotary inv_freq)
        # are in no state dict, so a model built under torch.device("meta") cannot run
        still = [n for n, t in list(self.base_model.named_parameters()) +
                 list(self.base_model.named_buffers())
                 if t.is_meta and n not in mapped and ".adapters." not in n]
        if still:
            raise ValueError(f"load_base_weights: {still[:3]} would stay on the meta device "
                             "(not in the state dict: non-persistent buffers?). Build the "
                             "empty model with accelerate.init_empty_weights() (buffers stay "
                             "real) or load those first")
        self.base_model.load_state_dict(mapped, strict=False, assign=True)
        for layer in lori.values():
            layer.base.requires_grad_(False)
            for ad in layer.adapters.values():
                if ad.values.is_meta:
                    ad.materialize_(layer.base.weight.device)
        for m in saved.values():
            m.original_module.requires_grad_(False)
        if hasattr(self.base_model, "tie_weights"):
            self.base_model.tie_weights()
        freeze_non_lori(self.base_model)
        self._apply_trainable()

    # ---- adapter directories ----
    def _record(self, adapter_name: str) -> dict:
        layers = {}
        for name, layer in lori_layers(self.base_model).items():
            if adapter_name in layer.adapters:
                in_f, out_f = layer.in_features, layer.out_features
                layers[name] = {"in_features": in_f, "out_features": out_f,
                                "fingerprint": None if layer.merged
                                else _fingerprint(layer.base)}
        return {"lori_record_version": RECORD_VERSION, "lori_layers": layers,
                "lori_a_spec_version": spec.A_SPEC_VERSION,
                "lori_b_spec_version": spec.B_SPEC_VERSION}

    def save_pretrained(self, save_directory: str | os.PathLike,
                        selected_adapters: list[str] | None = None, *,
                        dtype: torch.dtype | None = None) -> None:
        """Write each adapter as PEFT lays it out: "default" in `save_directory`, any other in
        `save_directory`/<name>. Each directory: adapter_config.json (the LoRIConfig and a
        record of the base: name, revision, every adapted layer's shape and weight
        fingerprint), adapter_model.safetensors (the compact LoRI file; `dtype`: store B's
        values in it, e.g. torch.bfloat16), modules_to_save.safetensors if any."""
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for n in names:
            if n in self._combined:
                raise ValueError(f"{n!r} is a combination (add_weighted_adapter) with no B of "
                                 f"its own: save its parts {self._combined[n][0]}, or "
                                 "merge_and_unload it")
            if n not in self.peft_config:
                raise ValueError(f"no adapter {n!r} (adapters: {list(self.peft_config)})")
        # Under FSDP2 every rank gathers (in one order), rank 0 alone writes, and every
        # rank returns or raises alike (lori_kernels.distributed.fsdp.on_rank0).
        fsdp = _io._sharded(self.base_model)
        for n in names:
            out = os.fspath(save_directory) if n == "default" else os.path.join(
                save_directory, n)
            if fsdp is None:
                os.makedirs(out, exist_ok=True)
            _io.save_adapter(self.base_model, os.path.join(out, _io.WEIGHTS_NAME), n,
                             dtype=dtype)
            record = self._record(n)
            tensors = {}
            for mname, m in _modules_to_save(self.base_model).items():
                if n in m.modules_to_save:
                    for k, v in m.modules_to_save[n].state_dict().items():
                        v = v.detach()
                        v = v.full_tensor() if hasattr(v, "full_tensor") else v
                        tensors[f"{mname}.{k}"] = v.cpu().contiguous()

            def write(out=out, n=n, record=record, tensors=tensors):
                os.makedirs(out, exist_ok=True)
                self.peft_config[n].save_pretrained(out, extra=record)
                path = os.path.join(out, MODULES_TO_SAVE_NAME)
                if tensors:
                    from safetensors.torch import save_file

                    save_file(tensors, path, metadata={"format": "pt"})
                elif os.path.exists(path):
                    os.remove(path)

            if fsdp is None:
                write()
            else:
                fsdp.on_rank0(write, f"save_pretrained({os.fspath(save_directory)!r})")

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike,
                        adapter_name: str = "default", is_trainable: bool = False, *,
                        check_base: bool = True) -> "LoRIModel":
        """Load the adapter directory `model_id` into the plain base `model` (PEFT's
        PeftModel.from_pretrained). Refuses, before changing the model: a different base
        (its name or revision differs from the recorded one, or, with check_base, a layer's
        weight fingerprint does), another layer shape, any invalid field of the files.
        is_trainable=False loads it for inference (frozen)."""
        if isinstance(model, LoRIModel):
            raise ValueError("the model is already a LoRIModel: use its load_adapter")
        lori = cls(model)
        lori.load_adapter(model_id, adapter_name, is_trainable=is_trainable,
                          check_base=check_base)
        lori.set_adapter(adapter_name)
        return lori

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str,
                     is_trainable: bool = False, *, check_base: bool = True) -> None:
        """Add the adapter directory `model_id` as `adapter_name` (inactive unless it is the
        only one; set_adapter switches). All or nothing, see from_pretrained."""
        check_adapter_name(adapter_name)
        if adapter_name in self.adapter_names:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        d = os.fspath(model_id)
        fields, extra = read_config_json(d)
        config = LoRIConfig.from_dict(fields)
        config.inference_mode = not is_trainable
        self._check_base(config, extra, d, check_base)
        weights = os.path.join(d, _io.WEIGHTS_NAME)
        meta, _ = _io.read_adapter(weights) if os.path.isfile(weights) else (None, None)
        if meta is None:
            raise ValueError(f"{weights}: no such file")
        if set(meta["layers"]) != set(extra.get("lori_layers", meta["layers"])):
            raise ValueError(f"{d}: {CONFIG_NAME} and {_io.WEIGHTS_NAME} describe different "
                             "layers")
        saved = self._check_modules_to_save(d, config)
        # every check done: from here on the model changes (load_adapter checks its file
        # against the model before it touches it)
        _io.load_adapter(self.base_model, weights, adapter_name, trainable=is_trainable,
                         activate=False, freeze_base=False)
        self._wrap_saved(list(saved), adapter_name)
        for mname, tensors in saved.items():
            m = self.base_model.get_submodule(mname)
            m.modules_to_save[adapter_name].load_state_dict(tensors, strict=True)
        freeze_non_lori(self.base_model)
        self.peft_config[adapter_name] = config
        self._trainable[adapter_name] = is_trainable
        if not self.active_adapters:
            self.set_adapter(adapter_name)
        self._apply_trainable()

    def _check_base(self, config: LoRIConfig, extra: dict, d: str, check_base: bool) -> None:
        name, revision = _base_name(self.base_model)
        if check_base and config.base_model_name_or_path and name and \
                config.base_model_name_or_path != name:
            raise ValueError(f"{d}: the adapter was trained on base "
                             f"{config.base_model_name_or_path!r}, this model is {name!r} "
                             "(pass check_base=False to load it anyway)")
        if check_base and config.revision and revision and config.revision != revision:
            raise ValueError(f"{d}: the adapter was trained on revision {config.revision!r} "
                             f"of its base, this model is revision {revision!r}")
        layers = extra.get("lori_layers")
        if not isinstance(layers, dict) or not layers:
            raise ValueError(f"{d}/{CONFIG_NAME}: lori_layers (the record of the base's "
                             "layers) is missing")
        for lname, rec in layers.items():
            try:
                mod = self.base_model.get_submodule(lname)
            except AttributeError:
                raise ValueError(f"{d}: layer {lname!r} is not in the model (a different "
                                 "base?)") from None
            if not (is_adaptable(mod) or isinstance(mod, LoRILinear)):
                raise ValueError(f"{d}: layer {lname!r} is a {type(mod).__name__}, not an "
                                 "nn.Linear or Conv1D")
            if not isinstance(rec, dict) or features(mod) != (rec.get("in_features"),
                                                              rec.get("out_features")):
                raise ValueError(f"{d}: layer {lname!r} is {features(mod)} (in, out) in the "
                                 f"model but was {rec.get('in_features')}, "
                                 f"{rec.get('out_features')} in the adapter's base")
            base = mod.base if isinstance(mod, LoRILinear) else mod
            fp, mine = rec.get("fingerprint"), _fingerprint(base)
            if check_base and fp is not None and mine is not None and not (
                    isinstance(mod, LoRILinear) and mod.merged) and \
                    not _fingerprints_match(fp, mine, *features(mod)):
                raise ValueError(f"{d}: layer {lname!r} has other weights than the base the "
                                 "adapter was trained on (a different base model or "
                                 "checkpoint; pass check_base=False to load it anyway)")

    def _check_modules_to_save(self, d: str, config: LoRIConfig) -> dict[str, dict]:
        path = os.path.join(d, MODULES_TO_SAVE_NAME)
        if not config.modules_to_save:
            if os.path.exists(path):
                raise ValueError(f"{path}: present but the config has no modules_to_save")
            return {}
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing (the config lists modules_to_save="
                             f"{config.modules_to_save})")
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except Exception as e:  # safetensors' own error types
            raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
        names = _saved_names(self.base_model, config)
        out = {}
        for mname in names:
            mod = self.base_model.get_submodule(mname)
            ref = mod.original_module if isinstance(mod, ModulesToSave) else mod
            own = ref.state_dict()
            got = {k[len(mname) + 1:]: v for k, v in tensors.items()
                   if k.startswith(mname + ".")}
            if set(got) != set(own):
                raise ValueError(f"{path}: {mname}: keys {sorted(got)[:4]} do not match the "
                                 f"module's {sorted(own)[:4]}")
            for k, v in got.items():
                if tuple(v.shape) != tuple(own[k].shape):
                    raise ValueError(f"{path}: {mname}.{k}: shape {tuple(v.shape)}, the model "
                                     f"has {tuple(own[k].shape)}")
            out[mname] = got
        stray = [k for k in tensors if not any(k.startswith(n + ".") for n in names)]
        if stray:
            raise ValueError(f"{path}: tensors for no module of modules_to_save: {stray[:3]}")
        return out

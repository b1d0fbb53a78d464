"""LoRILinear, a drop-in for nn.Linear carrying one or more LoRI adapters.

Layering (docs/architecture.md): lori_kernels.ops (routed kernels) -> `lori_delta` /
`lori_linear` below (functional) -> LoRIAdapter (one adapter's B and the recipe of its A) ->
LoRILinear (frozen base + a ModuleDict of adapters + the active combination). LoRILinear.forward
is one call.

An adapter's A is regenerated from (seed, distribution) inside the op: it is never a
parameter and never in the state dict. B is always a bitmask PackedB: in the LoRI-D phase the
mask is all ones (dense B, same op), in the LoRI-S phase only the mask's entries exist, so the
trainable parameter (and the optimizer state) is the mask's nnz values only.

Imported adapters whose A cannot be regenerated (PEFT / official LoRI checkpoints) carry an
explicit `a` buffer; that path is a documented Python fallback: F.linear for the A side, the
packed B scattered into a dense (out, rank) matrix for the B side (see `lori_delta`).

LoRIAdapter is also the unit an AdapterPool takes (`pool.add(name, adapter)` through
`LoRIAdapter.pool_args`), for LoRIPoolLinear's per-token adapters (lori_kernels/nn/pool_linear.py).
"""
from __future__ import annotations

import json
import math
import numbers
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, spec
from ..packing import PackedB, chunk_offsets, pack_mask, unpack_mask, validate_packed

DEFAULT_ADAPTER = "default"
PHASES = ("dense", "sparse")

# One term of the active combination: (adapter giving B, adapter giving A, coefficient).
# delta = sum_terms coef * (x @ A_a^T) @ B_b^T. A plain adapter is (n, n, scale); PEFT's "cat"
# is (n_i, n_i, w_i s_i); PEFT's "linear" also has cross terms (n_i, n_j, c_i c_j).
Term = tuple[str, str, float]


RECIPE_FORMAT = "lori_kernels.recipe"
# Fields of a recipe that define the adapter (a state dict differing in one is another adapter);
# phase and nnz may differ: loading then switches B's structure.
RECIPE_IDENTITY = ("in_features", "out_features", "rank", "alpha", "seed", "distribution", "a",
                   "a_spec_version", "b_spec_version")


def check_alpha(alpha, name: str = "alpha") -> float:
    """alpha as a float, refusing what would make every output NaN or the adapter a no-op."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or \
            not math.isfinite(float(alpha)) or float(alpha) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def check_adapter_name(name, what: str = "adapter_name") -> str:
    """Adapter names are ModuleDict keys and state-dict path parts: Python identifiers."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{what} must be a str that is a Python identifier (no '.', not "
                         f"empty), got {name!r}")
    return name


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 style): weight (in, out), y = x @ W + b. Duck-typed so that
    this layer does not import transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and \
        isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear, a Conv1D or a LoRILinear."""
    if is_conv1d(module):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


# ---- stale parameters --------------------------------------------------------------------------
# Switching B's structure (LoRI-D -> LoRI-S, loading a state of another phase) replaces the
# `values` Parameter. An optimizer built before still holds the old one, which no longer gets
# gradients: torch optimizers skip it, so training would silently do nothing. The old Parameter
# is marked retired, and a process-wide optimizer step pre-hook refuses to step any optimizer
# that holds a retired Parameter.

_retired = {"count": 0, "hook": None}


def _refuse_retired_params(optimizer, args, kwargs):
    if not _retired["count"]:
        return
    n = sum(len(g["params"]) for g in optimizer.param_groups)
    key = (_retired["count"], n)
    if getattr(optimizer, "_lori_checked", None) == key:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            why = getattr(p, "_lori_retired", None)
            if why is not None:
                raise RuntimeError(
                    f"{type(optimizer).__name__} holds a LoRI values Parameter that was "
                    f"replaced ({why}); it gets no gradients any more, so this step would train "
                    "nothing. Build a new optimizer (and LR scheduler) over the model's current "
                    "trainable parameters (LoRIModel.to_sparse / calibrate return them); "
                    "re-wrap DDP/FSDP/compiled models too.")
    optimizer._lori_checked = key


def retire_parameter(p: nn.Parameter, why: str) -> None:
    """Mark `p` as replaced so that any optimizer still holding it raises at step()."""
    p._lori_retired = why
    p.requires_grad_(False)
    _retired["count"] += 1
    if _retired["hook"] is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _retired["hook"] = register_optimizer_step_pre_hook(
            _refuse_retired_params)


def is_retired(p: torch.Tensor) -> bool:
    return getattr(p, "_lori_retired", None) is not None


def decode_recipe(value, where: str) -> dict:
    """A recipe from its state-dict form (a uint8 tensor of JSON, or a dict)."""
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.uint8 or value.dim() != 1:
            raise ValueError(f"{where}: the LoRI recipe must be a 1-D uint8 tensor of JSON, got "
                             f"{value.dtype} {tuple(value.shape)}")
        try:
            value = json.loads(bytes(value.cpu().numpy().tobytes()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: the LoRI recipe is not JSON ({e})") from None
    if not isinstance(value, dict) or value.get("format") != RECIPE_FORMAT:
        raise ValueError(f"{where}: not a LoRI adapter recipe")
    missing = [k for k in RECIPE_IDENTITY + ("phase", "nnz") if k not in value]
    if missing:
        raise ValueError(f"{where}: the LoRI recipe lacks {missing}")
    return value


# ---- functional --------------------------------------------------------------------------------

def lori_delta(x: torch.Tensor, b: "LoRIAdapter", a: "LoRIAdapter", coef: float,
               backend: str | None = None) -> torch.Tensor:
    """coef * (x @ A^T) @ B^T with B from adapter `b` and A from adapter `a` (same rank).

    Seeded A: one sparse_delta op call, routed by lori_kernels.backends (A regenerated per tile,
    B read packed; gradients to x and b.values). Explicit A (imported): fallback in PyTorch, F.linear(x, A)
    then F.linear with B scattered from its packed values (differentiable w.r.t. the values).
    """
    values = b.values if b.values.dtype == x.dtype else b.values.to(x.dtype)
    if a.a is None:
        return ops._sparse_delta(x, b.mask, values, b.offsets, b.rank, a.seed_op,
                                 a.distribution, float(coef), backend)
    dense_b = torch.zeros(b.out_features, b.rank, dtype=x.dtype, device=x.device)
    dense_b = dense_b.masked_scatter(unpack_mask(b.mask, b.rank), values)
    return F.linear(F.linear(x, a.a.to(x.dtype)), dense_b) * coef


def lori_linear(x: torch.Tensor, base: nn.Linear, adapters: nn.ModuleDict,
                terms: Sequence[Term], backend: str | None = None) -> torch.Tensor:
    """base(x) + sum over terms of lori_delta (terms empty, e.g. when merged: base(x) only)."""
    y = base(x)
    for b_name, a_name, coef in terms:
        y = y + lori_delta(x, adapters[b_name], adapters[a_name], coef, backend)
    return y


# ---- one adapter -------------------------------------------------------------------------------

class LoRIAdapter(nn.Module):
    """One adapter of one layer: B (out_features x rank) as mask/values/offsets, A's recipe.

    Buffers `mask`, `offsets` (and `a` for an imported explicit A) and the Parameter `values`
    are its whole state. A seeded A is described by (seed, distribution) plain attributes,
    which save_adapter writes to the file's JSON metadata.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
                 seed: int | None, distribution: str = spec.DEFAULT_DISTRIBUTION,
                 dtype: torch.dtype = torch.float32, device=None, a: torch.Tensor | None = None):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= spec.MAX_RANK:
            raise ValueError(f"rank must be an int in [1, {spec.MAX_RANK}], got {rank!r}")
        spec.check_distribution(distribution)
        alpha = check_alpha(alpha)
        if a is None and seed is None:
            raise ValueError("an adapter needs a seed (or an explicit A)")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha = float(alpha)
        self.distribution = distribution
        self.seed = None if seed is None else spec.seed_from_op(spec.check_seed(seed))
        self.seed_op = None if seed is None else spec.check_seed(seed)
        if a is not None:
            if tuple(a.shape) != (rank, in_features):
                raise ValueError(f"explicit A must be ({rank}, {in_features}), got "
                                 f"{tuple(a.shape)}")
            self.register_buffer("a", a.detach().clone())
        else:
            self.a = None
        # The all-ones pattern is computed on the CPU and moved: it works for a model on the
        # meta device (init_empty_weights), where packing cannot read values.
        full = torch.ones(out_features, rank, dtype=torch.bool)
        self.register_buffer("mask", pack_mask(full).to(device))
        self.register_buffer("offsets", chunk_offsets(full).to(device))
        self.values = nn.Parameter(torch.zeros(out_features * rank, dtype=dtype, device=device))
        self.phase = "dense"
        self.adapter_seed: int | None = None  # the model-level seed this layer's seed came from

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def packed(self) -> PackedB:
        return PackedB(self.mask, self.values, self.offsets, self.rank)

    def bool_mask(self) -> torch.Tensor:
        return unpack_mask(self.mask, self.rank)

    def dense_b(self) -> torch.Tensor:
        """B (out, rank) dense, detached (zeros off the mask)."""
        out = torch.zeros(self.out_features, self.rank, dtype=self.values.dtype,
                          device=self.values.device)
        out[self.bool_mask()] = self.values.detach()
        return out

    def materialize_a(self, dtype=torch.float32) -> torch.Tensor:
        """A (rank, in_features): the explicit one, or regenerated from the seed."""
        if self.a is not None:
            return self.a.to(dtype)
        return ops.random_a(self.seed, self.rank, self.in_features, distribution=self.distribution,
                        dtype=dtype, device=self.mask.device)

    @torch.no_grad()
    def set_pattern(self, mask: torch.Tensor, values: torch.Tensor | None = None, *,
                    phase: str = "sparse") -> None:
        """Replace B's pattern by bool `mask` (out, rank). `values`: dense (out, rank) to keep
        on the mask, packed (nnz,), or None for zeros (LoRI-S re-initialisation). The values
        Parameter is replaced: build the optimizer after this call."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if mask.shape != (self.out_features, self.rank) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool ({self.out_features}, {self.rank}), got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        mask = mask.to(self.mask.device)
        old = self.values
        if values is None:
            new = torch.zeros(int(mask.sum()), dtype=old.dtype, device=old.device)
        elif values.dim() == 2:
            new = values.to(device=old.device, dtype=old.dtype)[mask].contiguous()
        else:
            new = values.to(device=old.device, dtype=old.dtype).contiguous()
        if new.numel() != int(mask.sum()):
            raise ValueError(f"{new.numel()} values for a mask with {int(mask.sum())} entries")
        self.mask = pack_mask(mask)
        self.offsets = chunk_offsets(mask)
        self.values = nn.Parameter(new, requires_grad=old.requires_grad)
        retire_parameter(old, f"B switched to the {phase} phase")
        self.phase = phase

    @torch.no_grad()
    def load_packed(self, mask_words: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                    *, phase: str) -> None:
        """Install an already validated packed B (from a file)."""
        old = self.values
        self.mask = mask_words.to(self.mask.device)
        self.offsets = offsets.to(self.mask.device)
        self.values = nn.Parameter(values.to(device=old.device, dtype=old.dtype).contiguous(),
                                   requires_grad=old.requires_grad)
        retire_parameter(old, "B loaded from a file")
        self.phase = phase

    @torch.no_grad()
    def materialize_(self, device, dtype: torch.dtype | None = None) -> None:
        """A fresh LoRI-D adapter created on the meta device, made real on `device` (B zeros,
        all-ones mask): the step after loading the base weights into an empty model."""
        if self.phase != "dense":
            raise ValueError("only a fresh LoRI-D adapter can be materialized (its B is zeros); "
                             "load a LoRI-S adapter from its file instead")
        old = self.values
        full = torch.ones(self.out_features, self.rank, dtype=torch.bool)
        self.mask = pack_mask(full).to(device)
        self.offsets = chunk_offsets(full).to(device)
        self.values = nn.Parameter(torch.zeros(self.out_features * self.rank,
                                               dtype=dtype or old.dtype, device=device),
                                   requires_grad=old.requires_grad)
        if self.a is not None and self.a.is_meta:
            raise ValueError("an explicit A on the meta device cannot be materialized")

    # ---- the recipe in the state dict ----
    def recipe(self) -> dict:
        """Everything that defines this adapter besides B's values: a state dict carrying
        another recipe is another adapter and is refused on load."""
        return {"format": RECIPE_FORMAT, "in_features": self.in_features,
                "out_features": self.out_features, "rank": self.rank, "alpha": self.alpha,
                "seed": None if self.seed is None else str(self.seed),
                "distribution": self.distribution,
                "a": "stored" if self.a is not None else "seed",
                "a_spec_version": spec.A_SPEC_VERSION, "b_spec_version": spec.B_SPEC_VERSION,
                "phase": self.phase, "nnz": self.nnz,
                "adapter_seed": None if self.adapter_seed is None else str(self.adapter_seed)}

    def get_extra_state(self) -> torch.Tensor:
        # A uint8 tensor of JSON (not a dict) so that safetensors, torch.load(weights_only=True)
        # and Hugging Face save_pretrained all carry it.
        data = json.dumps(self.recipe(), sort_keys=True).encode("utf-8")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()

    def set_extra_state(self, state) -> None:
        recipe = decode_recipe(state, "recipe")
        self.phase = recipe["phase"]
        seed = recipe.get("adapter_seed")
        self.adapter_seed = None if seed is None else int(seed)

    def check_state(self, state_dict: dict, prefix: str) -> dict:
        """Validate this adapter's entries of `state_dict` (keys `prefix` + name) without
        touching anything: the recipe matches this adapter's, and the packed B is
        consistent. Raises ValueError naming the key and the field."""
        key = prefix + "_extra_state"
        if key not in state_dict:
            if prefix + "values" in state_dict:
                raise ValueError(f"{prefix}values: the state dict has no LoRI recipe "
                                 f"({key}); it cannot be checked against this adapter's seed, "
                                 "rank and alpha, and is refused")
            return {}
        recipe = decode_recipe(state_dict[key], key)
        mine = self.recipe()
        for field in RECIPE_IDENTITY:
            if recipe[field] != mine[field]:
                raise ValueError(
                    f"{key}: {field} is {recipe[field]!r} in the state dict but "
                    f"{mine[field]!r} in the model: that state belongs to another adapter "
                    "(inject with the same LoRIConfig, or load its adapter file with "
                    "LoRIModel.from_pretrained / load_adapter)")
        if recipe["phase"] not in PHASES:
            raise ValueError(f"{key}: phase must be one of {PHASES}, got {recipe['phase']!r}")
        mask, values, offsets = (state_dict.get(prefix + k) for k in ("mask", "values",
                                                                       "offsets"))
        if mask is None or values is None or offsets is None:
            raise ValueError(f"{prefix}: the state dict has the recipe but not all of mask, "
                             "values, offsets")
        try:
            validate_packed(mask, values.detach(), offsets, self.rank)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{prefix}values/mask/offsets: {e}") from None
        if mask.shape[0] != self.out_features or values.numel() != recipe["nnz"]:
            raise ValueError(f"{prefix}values: {values.numel()} values for out_features "
                             f"{mask.shape[0]} disagree with the recipe (nnz {recipe['nnz']}, "
                             f"out_features {self.out_features})")
        if recipe["phase"] == "dense" and recipe["nnz"] != self.out_features * self.rank:
            raise ValueError(f"{key}: a dense-phase B must have out_features*rank values")
        return recipe

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        recipe = self.check_state(state_dict, prefix)
        if recipe and state_dict[prefix + "values"].numel() != self.values.numel():
            # Another phase (e.g. a LoRI-S state into a freshly injected LoRI-D model): take
            # its structure, then the usual copy fills mask, offsets and values.
            with torch.no_grad():
                old = self.values
                self.values = nn.Parameter(
                    torch.zeros(recipe["nnz"], dtype=old.dtype, device=old.device),
                    requires_grad=old.requires_grad)
                retire_parameter(old, f"B switched to the {recipe['phase']} phase by "
                                      "load_state_dict")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def pool_args(self) -> dict:
        """The plain arguments an AdapterPool takes for this adapter (AdapterPool.add)."""
        if self.a is not None:
            raise ValueError("this adapter has an explicit A; a pool needs seeded A's")
        return {"b": self.packed(), "seed": self.seed, "distribution": self.distribution,
                "scale": self.scale, "in_features": self.in_features}

    def extra_repr(self) -> str:
        a = "explicit" if self.a is not None else f"seed={self.seed:#x}, {self.distribution}"
        return (f"rank={self.rank}, alpha={self.alpha:g}, A=({a}), phase={self.phase}, "
                f"nnz={self.nnz}")


# ---- the layer ---------------------------------------------------------------------------------

class _LinearAttrs:
    """nn.Linear look-alike attributes of a wrapped `self.base` (HF code reads .weight.dtype,
    .in_features, ...). For a transformers Conv1D base, `weight` is its own (in, out) matrix, as
    the code around it expects."""

    fan_in_fan_out = False  # a layer over a Conv1D sets it (its weight is (in, out))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.weight.shape[0] if self.fan_in_fan_out else self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.nf if self.fan_in_fan_out else self.base.out_features


class LoRILinear(_LinearAttrs, nn.Module):
    """nn.Linear (frozen, as `base`) plus LoRI adapters: y = base(x) + sum of active deltas.

    The base may also be a transformers Conv1D (GPT-2's c_attn, c_proj, c_fc; weight stored
    (in, out), PEFT's fan_in_fan_out): the adapter is the same (A: rank x in, B: out x rank),
    only merge writes the transposed delta.

    `LoRILinear.from_linear(linear, rank=, alpha=, seed=, distribution=)` wraps an existing
    layer (no copy of its weight). More adapters: `add_adapter`; which ones apply and with what
    weights: `set_active` / `set_terms`; folding into the base weight: `merge` / `unmerge`.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not is_adaptable(base):
            raise TypeError(f"LoRILinear wraps an nn.Linear or a transformers Conv1D, got "
                            f"{type(base).__name__}")
        self.fan_in_fan_out = is_conv1d(base)
        self.base = base
        base.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.terms: tuple[Term, ...] = ()
        self.merged_terms: tuple[Term, ...] = ()
        # None: the process-wide choice (lori_kernels.backends), read at each call.
        self.backend: str | None = None

    @property
    def merged(self) -> bool:
        return bool(self.merged_terms)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int, alpha: float, seed: int,
                    distribution: str = spec.DEFAULT_DISTRIBUTION,
                    adapter_name: str = DEFAULT_ADAPTER, dtype: torch.dtype = torch.float32,
                    ) -> "LoRILinear":
        layer = cls(linear)
        layer.add_adapter(adapter_name, rank=rank, alpha=alpha, seed=seed,
                          distribution=distribution, dtype=dtype)
        return layer

    def add_adapter(self, name: str, *, rank: int, alpha: float, seed: int | None,
                    distribution: str = spec.DEFAULT_DISTRIBUTION,
                    dtype: torch.dtype = torch.float32, a: torch.Tensor | None = None,
                    activate: bool = True) -> LoRIAdapter:
        """Add a LoRI-D adapter (B all zeros on an all-ones mask). `activate` adds it to the
        active combination with weight 1."""
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        ad = LoRIAdapter(self.in_features, self.out_features, rank=rank, alpha=alpha, seed=seed,
                         distribution=distribution, dtype=dtype, device=self.base.weight.device,
                         a=a)
        self.adapters[name] = ad
        if activate:
            self.set_terms(self.terms + ((name, name, ad.scale),))
        return ad

    def delete_adapter(self, name: str) -> None:
        self._check_unmerged("delete_adapter")
        del self.adapters[name]
        self.terms = tuple(t for t in self.terms if name not in t[:2])

    def set_terms(self, terms: Iterable[Term]) -> None:
        """Set the active combination explicitly (see Term)."""
        self._check_unmerged("set_terms")
        terms = tuple((str(b), str(a), float(c)) for b, a, c in terms)
        for b, a, _ in terms:
            for n in (b, a):
                if n not in self.adapters:
                    raise KeyError(f"no adapter {n!r} in this layer ({list(self.adapters)})")
            if self.adapters[a].rank != self.adapters[b].rank:
                raise ValueError(f"term ({b!r}, {a!r}): B and A ranks differ")
        self.terms = terms

    def set_active(self, names: str | Sequence[str], weights: Sequence[float] | None = None
                   ) -> None:
        """Active adapters, each applied with weight * its alpha/rank (PEFT-style)."""
        names = [names] if isinstance(names, str) else list(names)
        weights = [1.0] * len(names) if weights is None else list(weights)
        if len(weights) != len(names):
            raise ValueError("one weight per adapter name")
        self.set_terms((n, n, w * self.adapters[n].scale) for n, w in zip(names, weights))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lori_linear(x, self.base, self.adapters, () if self.merged_terms else self.terms,
                           self.backend)

    # ---- merge ----
    @torch.no_grad()
    def merge(self) -> None:
        """weight += sum of active deltas, in place (the merge_delta_ op for seeded A;
        A is generated per tile and never whole). Idempotence guarded: merging twice raises."""
        if self.merged_terms:
            raise RuntimeError("LoRILinear is already merged")
        for term in self.terms:
            self._apply_term(term, sign=1.0)
        self.merged_terms = self.terms

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract what merge() added (exact up to the weight dtype's rounding)."""
        if not self.merged_terms:
            raise RuntimeError("LoRILinear is not merged")
        for term in reversed(self.merged_terms):
            self._apply_term(term, sign=-1.0)
        self.merged_terms = ()

    def _apply_term(self, term: Term, sign: float) -> None:
        b, a = self.adapters[term[0]], self.adapters[term[1]]
        coef = sign * term[2]
        if self.fan_in_fan_out:  # Conv1D keeps W^T: build the (out, in) delta, add it transposed
            delta = torch.zeros(self.out_features, self.in_features, dtype=torch.float32,
                                device=self.base.weight.device)
            self._add_delta(delta, b, a, coef)
            self.base.weight.add_(delta.T.to(self.base.weight.dtype))
        else:
            self._add_delta(self.base.weight, b, a, coef)

    def _add_delta(self, w: torch.Tensor, b: LoRIAdapter, a: LoRIAdapter, coef: float) -> None:
        """w (out, in) += coef * B_b A_a."""
        if a.a is None:
            vals = b.values.detach().to(w.dtype)
            ops._merge_delta_(w, b.mask, vals, b.offsets, b.rank, a.seed_op, a.distribution,
                              float(coef), self.backend)
        else:  # explicit A fallback: dense (out, rank) @ (rank, in), in fp32
            delta = b.dense_b().float() @ a.a.float()
            w.add_(delta.mul_(coef).to(w.dtype))

    def _check_unmerged(self, what: str) -> None:
        if self.merged_terms:
            raise RuntimeError(f"{what}: unmerge() first (the layer is merged)")

    def extra_repr(self) -> str:
        fifo = ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{fifo}, " \
               f"terms={list(self.terms)}, merged={self.merged}"

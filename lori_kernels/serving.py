"""Serving many LoRI adapters from one model, PEFT-style: `model(..., adapter_names=[...])`.

    sm = ServingModel(hf_model, ["q_proj", "v_proj", ...], rank=32)   # pools, one per layer
    sm.load_adapter("math.safetensors")             # lori_kernels.save_adapter's files
    sm.add_adapter("code", lori_model)              # or a LoRILinear model's adapter
    out = sm(input_ids, adapter_names=["math", "code", None, "__base__"])   # per sequence
    sm.delete_adapter("math")                       # at runtime, also while serving

Every targeted nn.Linear becomes a LoRIPoolLinear with its own AdapterPool; the pools are
managed together: an adapter has one slot, the same in every pool (a layer the adapter does not
cover leaves that slot empty: delta 0), so one id table serves every layer. A forward builds one
plan: names resolved and validated once against the model's adapter table, and the current
snapshot of every pool taken at the same moment, under the model lock; every pool layer reads
that plan (lori_kernels.nn.use_plan), with no per-layer id work in Python. The plan also
carries the tokens grouped by adapter (PoolPlan.op_inputs: built once per step on the host,
one copy to the device), which every layer hands to the op: no per-layer grouping, id check
or host sync (validation "full" checks the plan against the ids in every call).

Adding and removing adapters is safe while other threads serve (lori_kernels.pool): a step sees
an adapter in all layers or in none, and a removed adapter stays readable by the steps that
planned with it. Adapters whose A is stored (imported from PEFT, a: "stored") cannot be served
from a pool, whose kernels regenerate A from a seed: they are refused with ValueError.
save_adapters(dir) / load_adapters(dir) write and read each adapter as one adapter file.
"""
from __future__ import annotations

import os
import re
import threading
from typing import Mapping, Sequence

import torch
from torch import nn

from . import spec
from .nn import LoRIAdapter, LoRILinear, LoRIPoolLinear, use_plan
from .packing import PackedB
from .pool import AdapterPool, PoolPlan
from .workflow.format import _bits_from_words, read_adapter, write_adapter_file
from .workflow.inject import _matches, _set_submodule

__all__ = ["ServingModel"]

_FILE = "{}.safetensors"


class ServingModel(nn.Module):
    """A model whose targeted nn.Linear layers serve pools of LoRI adapters (module doc).

    rank: every adapter's rank (one per pool; `ranks` overrides it per layer name). dtype:
    the pools' values dtype (cast to x's dtype per call when they differ). capacity: initial
    slots per pool (they grow by doubling).
    """

    def __init__(self, model: nn.Module, target_modules: str | Sequence[str], *, rank: int,
                 ranks: Mapping[str, int] | None = None, dtype: torch.dtype = torch.float32,
                 capacity: int = 8, backend: str | None = None):
        super().__init__()
        names = [n for n, m in model.named_modules()
                 if n and isinstance(m, nn.Linear) and _matches(n, target_modules)]
        if not names:
            raise ValueError(f"no nn.Linear in the model matches target_modules="
                             f"{target_modules!r}")
        self.model = model
        self._lock = threading.RLock()
        self.layers: dict[str, LoRIPoolLinear] = {}
        dev = next(model.parameters()).device
        for n in names:
            lin = model.get_submodule(n)
            r = (ranks or {}).get(n, rank)
            pool = AdapterPool(lin.in_features, lin.out_features, r, dtype=dtype, device=dev,
                               capacity=capacity)
            layer = LoRIPoolLinear(lin, pool, backend=backend)
            _set_submodule(model, n, layer)
            self.layers[n] = layer
        self._slot: dict[str, int] = {}     # adapter -> its slot in every pool
        self._meta: dict[str, dict] = {}    # adapter -> {layer: alpha, ...} for saving
        self._state = self._capture()

    # ---- the adapter table ----
    @property
    def adapter_names(self) -> list[str]:
        return list(self._state[0])

    def __contains__(self, name: str) -> bool:
        return name in self._state[0]

    def _capture(self):
        """(name -> slot, pool key -> snapshot): what plans read, replaced after each write."""
        return (dict(self._slot),
                {layer.pool.key: layer.pool.snapshot() for layer in self.layers.values()})

    def add_adapter(self, name: str, source, adapter_name: str | None = None) -> int:
        """Add adapter `name` to every pool; returns its slot. `source`: a model with
        LoRILinear layers (its adapter `adapter_name`, default `name` or the only one, on the
        layers this model serves, by qualified name), or {layer name: LoRIAdapter |
        dict(b=PackedB, seed=, distribution=, scale=)}. All-or-nothing over all layers."""
        if isinstance(source, nn.Module):
            source = self._from_lori_model(source, adapter_name or name)
        if not isinstance(source, Mapping):
            raise TypeError("source must be a model with LoRILinear layers or a dict of "
                            f"per-layer adapters, got {type(source).__name__}")
        return self._add(name, dict(source))

    def load_adapter(self, path: str | os.PathLike, adapter_name: str | None = None) -> int:
        """Add the adapter stored at `path` (lori_kernels.save_adapter's file) as
        `adapter_name` (default: the file's name). Returns its slot."""
        meta, tensors = read_adapter(path)
        name = adapter_name or meta["adapter_name"]
        per_layer = {}
        for lname, lm in meta["layers"].items():
            if lm["a"] != "seed":
                raise ValueError(f"{os.fspath(path)}: layer {lname!r} has a stored A (an "
                                 "adapter imported from PEFT): pools regenerate A from a seed "
                                 "and cannot serve it; serve it with LoRILinear "
                                 "(lori_kernels.load_adapter) or merge it")
            per_layer[lname] = dict(
                b=PackedB(tensors[f"{lname}.mask"], tensors[f"{lname}.values"],
                          tensors[f"{lname}.offsets"], lm["rank"]),
                seed=int(lm["seed"]), distribution=lm["distribution"],
                scale=float(lm["alpha"]) / lm["rank"], alpha=float(lm["alpha"]),
                phase=lm["phase"], in_features=lm["in_features"])
        return self._add(name, per_layer)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` from every pool (steps already planned keep reading it)."""
        with self._lock:
            if name not in self._slot:
                raise KeyError(f"no adapter {name!r} ({self.adapter_names})")
            del self._slot[name]
            self._meta.pop(name, None)
            self._state = self._capture()  # plans from now on refuse the name
            for layer in self.layers.values():
                if name in layer.pool:
                    layer.pool.remove(name)
            self._state = self._capture()

    remove_adapter = delete_adapter

    def _from_lori_model(self, model: nn.Module, adapter_name: str) -> dict:
        found = {n: m for n, m in model.named_modules() if isinstance(m, LoRILinear)}
        if not found:
            raise ValueError("the source model has no LoRILinear layers")
        names = {a for m in found.values() for a in m.adapters}
        if adapter_name not in names and len(names) == 1:
            adapter_name = names.pop()
        out = {}
        for n, m in found.items():
            if adapter_name in m.adapters:
                out[n] = m.adapters[adapter_name]
        if not out:
            raise ValueError(f"no LoRILinear layer of the source has adapter {adapter_name!r}")
        return out

    def _add(self, name: str, per_layer: dict) -> int:
        if not isinstance(name, str) or not name or name == "__base__":
            raise ValueError(f"adapter name must be a non-empty str other than '__base__', got "
                             f"{name!r}")
        with self._lock:
            if name in self._slot:
                raise ValueError(f"adapter {name!r} is already served (delete_adapter first)")
            # everything checked against every layer before any pool is touched
            checked = {}
            for lname, ad in per_layer.items():
                layer = self.layers.get(lname)
                if layer is None:
                    raise ValueError(f"adapter {name!r} has layer {lname!r}, which this model "
                                     f"does not serve (served: {sorted(self.layers)[:4]}...)")
                if isinstance(ad, LoRIAdapter):
                    if ad.a is not None:
                        raise ValueError(f"adapter {name!r}, layer {lname!r}: a stored A "
                                         "(imported from PEFT) cannot be served from a pool, "
                                         "whose kernels regenerate A from a seed")
                    kw, alpha = {}, ad.alpha
                    obj = ad
                else:
                    if ad.get("in_features", layer.in_features) != layer.in_features:
                        raise ValueError(f"adapter {name!r}, layer {lname!r}: in_features "
                                         f"{ad['in_features']}, the layer {layer.in_features}")
                    obj = ad["b"]
                    kw = dict(seed=ad["seed"], distribution=ad.get("distribution"),
                              scale=ad.get("scale", 1.0))
                    alpha = ad.get("alpha", kw["scale"] * obj.rank)
                layer.pool.check_adapter(name, obj, **kw)
                checked[lname] = (obj, kw, alpha)
            if not checked:
                raise ValueError(f"adapter {name!r} has no layers")
            # one slot, free in every pool (growing them together when none is)
            pools = [layer.pool for layer in self.layers.values()]
            taken = set(self._slot.values())
            free = set.intersection(*(p.free_slots() for p in pools)) - taken
            slot = min(free) if free else max([p.capacity for p in pools] + [
                s + 1 for s in taken])
            done = []
            try:
                for lname, (obj, kw, _) in checked.items():
                    pool = self.layers[lname].pool
                    pool.add(name, obj, slot=slot, **kw)
                    done.append(pool)
                for layer in self.layers.values():  # the slot is an id in every pool
                    layer.pool.ensure_capacity(slot + 1)
            except BaseException:
                for pool in done:  # only a failure no check foresaw (e.g. out of memory)
                    pool.remove(name)
                raise
            self._slot[name] = slot
            self._meta[name] = {lname: alpha for lname, (_, _, alpha) in checked.items()}
            self._state = self._capture()
            return slot

    # ---- serving ----
    def plan(self, adapter_names: Sequence[str | None] | None) -> PoolPlan:
        """One plan for a step: a name (or None / "__base__" for the base model) per sequence
        or per token, validated once; None: the base model for every token."""
        slot_of, snaps = self._state  # one consistent pair (replaced whole by writers)
        if adapter_names is None:
            return PoolPlan(None, snaps)
        if isinstance(adapter_names, str):
            raise TypeError("adapter_names must be a list (one name per sequence), got a str")
        ids = []
        for a in adapter_names:
            if a is None or a == "__base__":
                ids.append(-1)
            else:
                s = slot_of.get(a)
                if s is None:
                    raise KeyError(f"no adapter {a!r} ({list(slot_of)})")
                ids.append(s)
        dev = next(iter(snaps.values())).masks.device
        return PoolPlan(None, snaps, host_ids=torch.tensor(ids, dtype=torch.int32), device=dev)

    def forward(self, *args, adapter_names: Sequence[str | None] | None = None,
                plan: PoolPlan | None = None, **kwargs):
        """model(*args, **kwargs) with adapter_names[i] on sequence i (PEFT's mixed batch;
        None / "__base__": no adapter), or with a plan made by self.plan."""
        if plan is None:
            plan = self.plan(adapter_names)
        with use_plan(plan):
            return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        """model.generate with one adapter per sequence (num_beams / num_return_sequences
        repeat each sequence's name, as PEFT does)."""
        rep = max(int(kwargs.get("num_beams", 1) or 1),
                  int(kwargs.get("num_return_sequences", 1) or 1))
        if adapter_names is not None and rep > 1:
            adapter_names = [n for n in adapter_names for _ in range(rep)]
        with use_plan(self.plan(adapter_names)):
            return self.model.generate(*args, **kwargs)

    # ---- saving ----
    def save_adapter(self, name: str, path: str | os.PathLike) -> int:
        """Write adapter `name` as one adapter file (lori_kernels.load_adapter reads it into a
        LoRILinear model too). Returns the file's bytes."""
        slot_of, _ = self._state
        if name not in slot_of:
            raise KeyError(f"no adapter {name!r} ({list(slot_of)})")
        tensors, layers_meta = {}, {}
        for lname, alpha in self._meta[name].items():
            layer = self.layers[lname]
            e = layer.pool.get(name)
            tensors[f"{lname}.mask"] = _bits_from_words(e.packed.mask, e.packed.rank)
            tensors[f"{lname}.values"] = e.packed.values.cpu().contiguous()
            tensors[f"{lname}.offsets"] = e.packed.offsets.cpu().contiguous()
            nnz, full = e.packed.nnz, layer.out_features * e.packed.rank
            layers_meta[lname] = {
                "in_features": layer.in_features, "out_features": layer.out_features,
                "rank": e.packed.rank, "alpha": alpha, "seed": str(e.seed),
                "distribution": e.distribution, "phase": "dense" if nnz == full else "sparse",
                "nnz": nnz, "a": "seed"}
        meta = {"adapter_name": name, "adapter_seed": None,
                "a_spec_version": spec.A_SPEC_VERSION, "b_spec_version": spec.B_SPEC_VERSION,
                "target_modules": list(layers_meta), "layers": layers_meta}
        return write_adapter_file(path, meta, tensors)

    def save_adapters(self, directory: str | os.PathLike) -> list[str]:
        """Every served adapter as `<directory>/<name>.safetensors`; returns the paths."""
        os.makedirs(directory, exist_ok=True)
        paths = []
        for name in self.adapter_names:
            if not re.fullmatch(r"[\w.-]+", name):
                raise ValueError(f"adapter name {name!r} is not a safe file name")
            path = os.path.join(directory, _FILE.format(name))
            self.save_adapter(name, path)
            paths.append(path)
        return paths

    def load_adapters(self, directory: str | os.PathLike) -> list[str]:
        """load_adapter for every *.safetensors file in `directory` (sorted); returns names."""
        names = []
        for f in sorted(os.listdir(directory)):
            if f.endswith(".safetensors"):
                name = f[:-len(".safetensors")]
                self.load_adapter(os.path.join(directory, f), name)
                names.append(name)
        return names

    # ---- sizes ----
    def adapter_nbytes(self, name: str) -> int:
        """Bytes adapter `name` holds over all pools."""
        return sum(layer.pool.nbytes(name) for layer in self.layers.values()
                   if name in layer.pool)

    @property
    def pools(self) -> dict[str, AdapterPool]:
        return {n: layer.pool for n, layer in self.layers.items()}

    def extra_repr(self) -> str:
        return f"layers={len(self.layers)}, adapters={len(self._slot)}"


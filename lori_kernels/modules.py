"""The module layer: LoRILinear, a drop-in for nn.Linear carrying one or more LoRI adapters.

Layering (docs/workflow.md): torch.ops.lori (kernels) -> `lori_delta` / `lori_linear` below
(functional) -> LoRIAdapter (one adapter's B and the recipe of its A) -> LoRILinear (frozen
base + a ModuleDict of adapters + the active combination). LoRILinear.forward is one call.

An adapter's A is regenerated from (seed, distribution) inside the op: it is never a
parameter and never in the state dict. B is always a bitmask PackedB: in the LoRI-D phase the
mask is all ones (dense B, same op), in the LoRI-S phase only the mask's entries exist, so the
trainable parameter (and the optimizer state) is the mask's nnz values only.

Imported adapters whose A cannot be regenerated (PEFT / official LoRI checkpoints) carry an
explicit `a` buffer; that path is a documented Python fallback: F.linear for the A side, the
packed B scattered into a dense (out, rank) matrix for the B side (see `lori_delta`).

Pool-ready: LoRIAdapter is the unit a future sibling (LoRIPoolLinear, per-token adapter ids)
stacks; nothing here assumes a single adapter per layer.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import spec
from .ops import resolve_backend
from .packing import PackedB, chunk_offsets, pack_mask, unpack_mask

DEFAULT_ADAPTER = "default"
PHASES = ("dense", "sparse")

# One term of the active combination: (adapter giving B, adapter giving A, coefficient).
# delta = sum_terms coef * (x @ A_a^T) @ B_b^T. A plain adapter is (n, n, scale); PEFT's "cat"
# is (n_i, n_i, w_i s_i); PEFT's "linear" also has cross terms (n_i, n_j, c_i c_j).
Term = tuple[str, str, float]


# ---- functional --------------------------------------------------------------------------------

def lori_delta(x: torch.Tensor, b: "LoRIAdapter", a: "LoRIAdapter", coef: float) -> torch.Tensor:
    """coef * (x @ A^T) @ B^T with B from adapter `b` and A from adapter `a` (same rank).

    Seeded A: one torch.ops.lori.sparse_delta call (A regenerated per tile, B read packed;
    gradients to x and b.values). Explicit A (imported): fallback in PyTorch, F.linear(x, A)
    then F.linear with B scattered from its packed values (differentiable w.r.t. the values).
    """
    values = b.values if b.values.dtype == x.dtype else b.values.to(x.dtype)
    if a.a is None:
        return torch.ops.lori.sparse_delta(x, b.mask, values, b.offsets, b.rank, a.seed_op,
                                           a.distribution, float(coef))
    dense_b = torch.zeros(b.out_features, b.rank, dtype=x.dtype, device=x.device)
    dense_b = dense_b.masked_scatter(unpack_mask(b.mask, b.rank), values)
    return F.linear(F.linear(x, a.a.to(x.dtype)), dense_b) * coef


def lori_linear(x: torch.Tensor, base: nn.Linear, adapters: nn.ModuleDict,
                terms: Sequence[Term]) -> torch.Tensor:
    """base(x) + sum over terms of lori_delta (terms empty, e.g. when merged: base(x) only)."""
    y = base(x)
    for b_name, a_name, coef in terms:
        y = y + lori_delta(x, adapters[b_name], adapters[a_name], coef)
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
        full = torch.ones(out_features, rank, dtype=torch.bool, device=device)
        self.register_buffer("mask", pack_mask(full))
        self.register_buffer("offsets", chunk_offsets(full))
        self.values = nn.Parameter(torch.zeros(out_features * rank, dtype=dtype, device=device))
        self.phase = "dense"

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
        from .ops import random_a
        return random_a(self.seed, self.rank, self.in_features, distribution=self.distribution,
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
        self.phase = phase

    def extra_repr(self) -> str:
        a = "explicit" if self.a is not None else f"seed={self.seed:#x}, {self.distribution}"
        return (f"rank={self.rank}, alpha={self.alpha:g}, A=({a}), phase={self.phase}, "
                f"nnz={self.nnz}")


# ---- the layer ---------------------------------------------------------------------------------

class _LinearAttrs:
    """nn.Linear look-alike attributes of a wrapped `self.base` (HF code reads .weight.dtype,
    .in_features, ...)."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features


class LoRILinear(_LinearAttrs, nn.Module):
    """nn.Linear (frozen, as `base`) plus LoRI adapters: y = base(x) + sum of active deltas.

    `LoRILinear.from_linear(linear, rank=, alpha=, seed=, distribution=)` wraps an existing
    layer (no copy of its weight). More adapters: `add_adapter`; which ones apply and with what
    weights: `set_active` / `set_terms`; folding into the base weight: `merge` / `unmerge`.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRILinear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        base.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.terms: tuple[Term, ...] = ()
        self.merged_terms: tuple[Term, ...] = ()


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
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        if not name.isidentifier():
            raise ValueError(f"adapter name must be an identifier, got {name!r}")
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
        return lori_linear(x, self.base, self.adapters, () if self.merged_terms else self.terms)

    # ---- merge ----
    @torch.no_grad()
    def merge(self) -> None:
        """weight += sum of active deltas, in place (torch.ops.lori.merge_delta_ for seeded A;
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
        w = self.base.weight
        coef = sign * term[2]
        if a.a is None:
            vals = b.values.detach().to(w.dtype)
            torch.ops.lori.merge_delta_(w, b.mask, vals, b.offsets, b.rank, a.seed_op,
                                        a.distribution, float(coef))
        else:  # explicit A fallback: dense (out, rank) @ (rank, in), in fp32
            delta = b.dense_b().float() @ a.a.float()
            w.add_(delta.mul_(coef).to(w.dtype))

    def _check_unmerged(self, what: str) -> None:
        if self.merged_terms:
            raise RuntimeError(f"{what}: unmerge() first (the layer is merged)")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"terms={list(self.terms)}, merged={self.merged}"


# ---- a pool of adapters, chosen per token (issue 4) ---------------------------------------------

class LoRIPoolLinear(_LinearAttrs, nn.Module):
    """nn.Linear (frozen, as `base`) serving an AdapterPool: each token gets its own adapter.

        layer = LoRIPoolLinear(linear, pool)
        layer.set_adapter_ids(["math", "code", None, ...])   # per token, or per sequence
        y = layer(x)          # base(x)[t] + scale_a (x[t] A_a^T) B_a^T, a = the token's adapter

    Ids are names, slot indices or None (no adapter), or an int tensor of slot indices; one per
    token (x.shape[:-1]) or one per sequence (x.shape[0], repeated over the sequence). They
    stay set until the next set_adapter_ids. forward is one torch.ops.lori.batched_sparse_delta
    call accumulating into base(x). Moving the layer (.to / .cuda) moves the pool too.
    backend: None/'auto'/'cpp'/'triton' (lori_kernels.ops.resolve_backend, at each forward).
    """

    def __init__(self, base: nn.Linear, pool, *, backend: str | None = None):
        super().__init__()
        from .pool import AdapterPool
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRIPoolLinear wraps an nn.Linear, got {type(base).__name__}")
        if not isinstance(pool, AdapterPool):
            raise TypeError(f"pool must be an AdapterPool, got {type(pool).__name__}")
        if (pool.in_features, pool.out_features) != (base.in_features, base.out_features):
            raise ValueError(f"the pool's adapters are {pool.in_features} -> {pool.out_features} "
                             f"but the layer is {base.in_features} -> {base.out_features}")
        self.base = base
        base.requires_grad_(False)
        self.pool = pool
        self.adapter_ids: torch.Tensor | None = None
        self.backend = backend

    def set_adapter_ids(self, ids) -> None:
        """Adapter per token (or per sequence) for the next forward calls (see the class doc)."""
        if not isinstance(ids, torch.Tensor):
            ids = self.pool.ids(ids)
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"adapter ids must be an int32/int64 tensor, got {ids.dtype}")
        self.adapter_ids = ids.to(self.pool.device)

    def _token_ids(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.adapter_ids
        if ids is None:
            raise RuntimeError("LoRIPoolLinear: call set_adapter_ids(...) before forward")
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if ids.numel() == tokens:
            return ids.reshape(-1)
        if x.dim() >= 3 and ids.numel() == x.shape[0]:  # one id per sequence
            return ids.reshape(-1).repeat_interleave(tokens // x.shape[0])
        raise ValueError(f"{ids.numel()} adapter ids for x of shape {tuple(x.shape)}: give one "
                         f"per token ({tokens}) or one per sequence")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masks, values, starts, offsets, seeds, scales, dists, rank = self.pool.op_args()
        if values.dtype != x.dtype:
            values = values.to(x.dtype)
        op = (torch.ops.lori.triton_batched_sparse_delta
              if resolve_backend(self.backend, x.device) == "triton"
              else torch.ops.lori.batched_sparse_delta)
        return op(x, self._token_ids(x), masks, values, starts, offsets, seeds, scales, dists,
                  rank, self.base(x))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.pool.to(self.base.weight.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, pool={self.pool}"

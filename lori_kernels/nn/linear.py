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

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, spec
from ..packing import PackedB, chunk_offsets, pack_mask, unpack_mask

DEFAULT_ADAPTER = "default"
PHASES = ("dense", "sparse")

# One term of the active combination: (adapter giving B, adapter giving A, coefficient).
# delta = sum_terms coef * (x @ A_a^T) @ B_b^T. A plain adapter is (n, n, scale); PEFT's "cat"
# is (n_i, n_i, w_i s_i); PEFT's "linear" also has cross terms (n_i, n_j, c_i c_j).
Term = tuple[str, str, float]


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
        w = self.base.weight
        coef = sign * term[2]
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
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"terms={list(self.terms)}, merged={self.merged}"

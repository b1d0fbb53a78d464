"""LoRIPoolLinear: an nn.Linear serving an AdapterPool, one adapter per token.

The pool (lori_kernels.pool) is data only; this layer hands its tensors to the batched op
(lori_kernels.ops, routed by lori_kernels.backends) together with base(x).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..pool import AdapterPool
from .linear import _LinearAttrs


class LoRIPoolLinear(_LinearAttrs, nn.Module):
    """nn.Linear (frozen, as `base`) serving an AdapterPool: each token gets its own adapter.

        layer = LoRIPoolLinear(linear, pool)
        layer.set_adapter_ids(["math", "code", None, ...])   # per token, or per sequence
        y = layer(x)          # base(x)[t] + scale_a (x[t] A_a^T) B_a^T, a = the token's adapter

    Ids are names, slot indices or None (no adapter), or an int tensor of slot indices; one per
    token (x.shape[:-1]) or one per sequence (x.shape[0], repeated over the sequence). They
    stay set until the next set_adapter_ids. forward is one batched_sparse_delta op call
    accumulating into base(x). Moving the layer (.to / .cuda) moves the pool too.
    backend: None/'auto'/'cpp'/'triton' (lori_kernels.backends, at each forward).
    """

    def __init__(self, base: nn.Linear, pool, *, backend: str | None = None):
        super().__init__()
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
        return ops._batched_sparse_delta(x, self._token_ids(x), masks, values, starts, offsets,
                                         seeds, scales, dists, rank, self.base(x), self.backend)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.pool.to(self.base.weight.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, pool={self.pool}"

"""LoRIPoolLinear: an nn.Linear serving an AdapterPool, one adapter per token.

The pool (lori_kernels.pool) is data only; this layer hands the tensors of one pool snapshot to
the batched op (lori_kernels.ops, routed by lori_kernels.backends) together with base(x).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import ops
from ..pool import AdapterPool, PoolPlan, current_plan
from .linear import _LinearAttrs


@contextlib.contextmanager
def use_plan(plan: PoolPlan | None):
    """Every LoRIPoolLinear called inside the block (in this thread / task) reads `plan`
    unless given one explicitly: how a model-level forward hands one plan to all its layers."""
    token = current_plan.set(plan)
    try:
        yield plan
    finally:
        current_plan.reset(token)


class LoRIPoolLinear(_LinearAttrs, nn.Module):
    """nn.Linear (frozen, as `base`) serving an AdapterPool: each token gets its own adapter.

        layer = LoRIPoolLinear(linear, pool)
        y = layer(x, plan=pool.plan(["math", "code", None, ...]))   # per token or sequence
        layer.set_adapter_ids(["math", None, ...]); y = layer(x)      # ids kept between calls

    Where the ids come from, first found: the `plan` argument; the plan of an enclosing
    use_plan block (lori_kernels.serving: one plan per step for every layer); the ids of the
    last set_adapter_ids. A plan holds a snapshot of the pool, so the forward reads the
    adapters as they were when the plan was made, whatever writers do meanwhile; no id is
    resolved or validated in Python here, and the op gets the plan's grouping of the tokens
    (PoolPlan.op_inputs: built once per step and token count, shared by every layer), so it
    neither groups nor checks the ids per call. Names / slot
    ints given to set_adapter_ids make a plan (kept until the next call); an int tensor is
    kept as raw slot indices read against the pool's current snapshot (pool module doc).
    Ids are one per token (x.shape[:-1]) or one per sequence (x.shape[0], repeated over the
    sequence). forward is one batched_sparse_delta op call accumulating into base(x); a base
    plan (plan.is_base) gives base(x). Moving the layer (.to / .cuda) moves the pool too.
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
        self._plan: PoolPlan | None = None
        self.backend = backend

    def set_adapter_ids(self, ids) -> None:
        """Adapter per token (or per sequence) for the next forward calls (see the class doc)."""
        if isinstance(ids, PoolPlan):
            self._plan, self.adapter_ids = ids, None
            return
        if not isinstance(ids, torch.Tensor):
            self._plan, self.adapter_ids = self.pool.plan(ids), None
            return
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"adapter ids must be an int32/int64 tensor, got {ids.dtype}")
        self._plan, self.adapter_ids = None, ids.to(self.pool.device)

    def _token_ids(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.adapter_ids
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if ids.numel() == tokens:
            return ids.reshape(-1)
        if x.dim() >= 3 and ids.numel() == x.shape[0]:  # one id per sequence
            return ids.reshape(-1).repeat_interleave(tokens // x.shape[0])
        raise ValueError(f"{ids.numel()} adapter ids for x of shape {tuple(x.shape)}: give one "
                         f"per token ({tokens}) or one per sequence")

    def forward(self, x: torch.Tensor, plan: PoolPlan | None = None) -> torch.Tensor:
        if plan is None:
            plan = current_plan.get()
            if plan is None:
                plan = self._plan
        tplan = None
        if plan is not None:
            if plan.is_base:  # the base plan: no adapter for any token
                return self.base(x)
            snap = plan.snapshot_for(self.pool)
            args = snap.op_args()
            ids, tplan = plan.op_inputs(x, snap)
        elif self.adapter_ids is not None:
            args = self.pool.op_args()
            ids = self._token_ids(x)
        else:
            raise RuntimeError("LoRIPoolLinear: give a plan (forward(x, plan=...) or use_plan) "
                               "or call set_adapter_ids(...) before forward")
        masks, values, starts, offsets, seeds, scales, dists, rank = args
        if values.dtype != x.dtype:
            values = values.to(x.dtype)
        return ops._batched_sparse_delta(x, ids, masks, values, starts, offsets, seeds, scales,
                                         dists, rank, self.base(x), self.backend, tplan)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.pool.to(self.base.weight.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, pool={self.pool}"

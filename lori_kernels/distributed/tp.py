"""Tensor parallelism for LoRILinear layers (Megatron layout) with plain local shards.

LoRIColwiseParallel: base weight rows and B rows sharded (B via PackedB.row_slice, so LoRI-S's
ragged per-rank nnz is just what each rank's rows hold); A whole, regenerated on every rank;
input replicated, output this rank's columns of y.

LoRIRowwiseParallel: base weight columns and A's column window sharded, B replicated; input
this rank's columns of x, output replicated. The delta takes the h route: h_local =
ops.shrink(x_local, col_start=c0, in_features=in) (fp32, A's window regenerated in the kernel
with the full in_features' scale and Philox columns; no A in memory), one all-reduce of h
(T x rank, out/rank times fewer bytes than y), then ops.expand with the whole B, so B's
gradient is the same on every rank and needs no communication.

Both styles modify the layer in place (parallelize_module does not put a returned module back
into a plan's parent) and work with `parallelize_module(model, mesh, {name: style})`. The
parameters stay plain local tensors, not DTensors: an optimizer, save or merge sees this rank's
shard. Only a 1-D mesh is supported.
"""
from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import LoRILinear
from ..nn.linear import retire_parameter

try:
    from torch.distributed.tensor.parallel import ParallelStyle
except ImportError:  # pragma: no cover - torch without DTensor
    ParallelStyle = object


class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the input gradient over the group (Megatron's f)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    """Sum over the group forward; identity backward (Megatron's g)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def _split(n: int, world: int, rank: int, what: str) -> tuple[int, int]:
    if n % world:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {world}")
    s = n // world
    return rank * s, (rank + 1) * s


def _group(device_mesh):
    if device_mesh.ndim != 1:
        raise ValueError("LoRI tensor-parallel styles take a 1-D device mesh")
    return device_mesh.get_group()


def _check_layer(module, style):
    if not isinstance(module, LoRILinear):
        raise TypeError(f"{style} shards a LoRILinear, got {type(module).__name__}")
    if module.fan_in_fan_out:
        raise TypeError(f"{style}: Conv1D bases are not supported")
    if module.merged:
        raise ValueError(f"{style}: unmerge the layer first")
    if getattr(module, "_lori_tp", None) is not None:
        raise ValueError(f"{style}: the layer is already sharded ({module._lori_tp[0]})")
    for name, ad in module.adapters.items():
        if ad.a is not None:
            raise TypeError(f"{style}: adapter {name!r} has an explicit A; only seeded A's are "
                            "sharded")


def _replace_values(ad, values: torch.Tensor, why: str) -> None:
    old = ad.values
    ad.values = nn.Parameter(values.detach().clone(), requires_grad=old.requires_grad)
    retire_parameter(old, why)


def rowwise_delta(x_local: torch.Tensor, b, a, coef: float, columns: tuple[int, int],
                  group=None, backend: str | None = None) -> torch.Tensor:
    """coef * (x @ A^T) @ B^T when this rank holds x[..., c0:c1] only: h_local = shrink of
    A's column window (full-width scale), all-reduced (T x rank, fp32), then expanded with the
    whole B (differentiable w.r.t. x_local and b.values; the all-reduce's backward is the
    identity, as every rank computes the same h and the same grad_h)."""
    c0, c1 = columns
    if x_local.shape[-1] != c1 - c0:
        raise ValueError(f"x_local has {x_local.shape[-1]} columns, the window {columns} "
                         f"has {c1 - c0}")
    h = ops._shrink(x_local, a.rank, a.seed_op, a.distribution, c0, a.in_features, backend)
    h = _ReduceFromTP.apply(h, group)
    values = b.values if b.values.dtype == x_local.dtype else b.values.to(x_local.dtype)
    return ops._expand(h, b.mask, values, b.offsets, float(coef), backend)


def _rowwise_forward(self, x):
    _, c0, c1, group = self._lori_tp
    y = _ReduceFromTP.apply(F.linear(x, self.base.weight), group)
    if self._lori_bias is not None:
        y = y + self._lori_bias
    for b_name, a_name, coef in (() if self.merged_terms else self.terms):
        y = y + rowwise_delta(x, self.adapters[b_name], self.adapters[a_name], coef, (c0, c1),
                              group)
    return y


def _colwise_pre_hook(module, args):
    return (_CopyToTP.apply(args[0], module._lori_tp[3]),) + tuple(args[1:])


class LoRIColwiseParallel(ParallelStyle):
    """Shard a LoRILinear's output features over a 1-D mesh (see the module docstring)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        _check_layer(module, "LoRIColwiseParallel")
        group = _group(device_mesh)
        o0, o1 = _split(module.out_features, device_mesh.size(), device_mesh.get_local_rank(),
                        "out_features")
        with torch.no_grad():
            base = module.base
            base.weight = nn.Parameter(base.weight[o0:o1].clone(), requires_grad=False)
            if base.bias is not None:
                base.bias = nn.Parameter(base.bias[o0:o1].clone(), requires_grad=False)
            base.out_features = o1 - o0
            for ad in module.adapters.values():
                p = ad.packed().row_slice(o0, o1)
                ad.mask, ad.offsets = p.mask.clone(), p.offsets.clone()
                _replace_values(ad, p.values, "B rows sharded by LoRIColwiseParallel")
                ad.out_features = o1 - o0
        module._lori_tp = ("colwise", o0, o1, group)
        module.register_forward_pre_hook(_colwise_pre_hook)
        return module


class LoRIRowwiseParallel(ParallelStyle):
    """Shard a LoRILinear's input features over a 1-D mesh (see the module docstring)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        _check_layer(module, "LoRIRowwiseParallel")
        group = _group(device_mesh)
        c0, c1 = _split(module.in_features, device_mesh.size(), device_mesh.get_local_rank(),
                        "in_features")
        with torch.no_grad():
            base = module.base
            base.weight = nn.Parameter(base.weight[:, c0:c1].clone(), requires_grad=False)
            # The bias is added once, after the all-reduce.
            module._lori_bias = base.bias
            base.bias = None
            base.in_features = c1 - c0
        module._lori_tp = ("rowwise", c0, c1, group)
        module.forward = types.MethodType(_rowwise_forward, module)
        return module

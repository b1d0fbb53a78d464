"""DDP across the LoRI-D -> LoRI-S switch.

The switch replaces every adapter's `values` Parameter (the old one is retired). A DDP wrapper
built before still has the old Parameters registered in its reducer: the new ones get local
gradients that are never all-reduced, and ranks silently diverge. So:
- `rebuild_ddp(ddp)` / `switch_phase(ddp, fn)` give a new wrapper over the same module;
- a stale wrapper (one whose registered Parameters include a retired one, or that does not
  have a trainable Parameter of its module) raises StaleDDPError at its next forward. The
  check is a process-wide forward pre-hook, installed when this module is imported and by
  to_sparse (the phase switch); it costs one type check per module call, and a walk over the
  wrapper's parameters per DDP forward.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..nn.linear import is_retired
from .verify import verify


class StaleDDPError(RuntimeError):
    """A DDP wrapper built before a LoRI phase switch was called."""


# DDP constructor arguments a rebuilt wrapper keeps (attribute on the wrapper -> argument).
_KEEP = {"device_ids": "device_ids", "output_device": "output_device",
         "broadcast_buffers": "broadcast_buffers", "process_group": "process_group",
         "find_unused_parameters": "find_unused_parameters",
         "gradient_as_bucket_view": "gradient_as_bucket_view", "static_graph": "static_graph"}


def _registered(ddp: DDP) -> list[torch.Tensor]:
    params = getattr(ddp, "_module_parameters", None)
    if params is None:  # older/newer torch: the module's parameters minus the ignored ones
        ignore = getattr(ddp, "parameters_to_ignore", set())
        params = [p for n, p in ddp.module.named_parameters() if n not in ignore]
    return params


def check_ddp(ddp: DDP) -> None:
    """Raise StaleDDPError when `ddp` no longer all-reduces its module's trainable Parameters."""
    if getattr(ddp, "_lori_stale", False):
        raise StaleDDPError("this DDP wrapper was replaced by rebuild_ddp/switch_phase: call "
                            "the wrapper they returned")
    registered = _registered(ddp)
    retired = [p for p in registered if is_retired(p)]
    ids = {id(p) for p in registered}
    ignore = getattr(ddp, "parameters_to_ignore", set())
    unregistered = [n for n, p in ddp.module.named_parameters()
                    if p.requires_grad and id(p) not in ids and n not in ignore]
    if retired or unregistered:
        what = f"{len(retired)} of its registered Parameters were replaced" if retired else \
            f"{len(unregistered)} trainable Parameters are not registered in it (first: " \
            f"{unregistered[:2]})"
        raise StaleDDPError(
            f"DDP wrapper is stale: {what} (a LoRI phase switch or a state load replaced the "
            "adapter values). Its gradients would not be all-reduced and ranks would silently "
            "diverge. Re-wrap: ddp = lori_kernels.distributed.rebuild_ddp(ddp), or use "
            "switch_phase(ddp, fn); then build the optimizer over the new parameters.")


def _pre_hook(module, args):
    if isinstance(module, DDP):
        check_ddp(module)


_hook = {"handle": None}


def install_stale_ddp_check() -> None:
    """Install (once) the process-wide forward pre-hook that runs check_ddp on every DDP
    forward."""
    if _hook["handle"] is None:
        _hook["handle"] = nn.modules.module.register_module_forward_pre_hook(_pre_hook)


def lori_ddp(model: nn.Module, *, group=None, broadcast_buffers: bool = False,
             check: bool = True, **kwargs) -> DDP:
    """DDP(model) after verify(model, group). broadcast_buffers defaults to False: LoRI's only
    buffers are the masks and offsets, constant during training (verify checks that they
    agree), and DDP would re-broadcast them at every forward (~5.6 MB per forward at
    Llama-3-8B, rank 32, 7 projections; benchmarks/bench_comm.py). Pass True if the model has
    other buffers that change (BatchNorm statistics)."""
    if check:
        verify(model, group)
    install_stale_ddp_check()
    return DDP(model, broadcast_buffers=broadcast_buffers, process_group=group, **kwargs)


def rebuild_ddp(ddp: DDP, *, check: bool = True, **overrides) -> DDP:
    """A new DDP wrapper over `ddp.module` with the same settings (overrides replace them),
    after verify(). The old wrapper is marked stale: calling it raises StaleDDPError. Build
    the optimizer (and scheduler) again over the new wrapper's parameters.

    DDP's constructor broadcasts rank 0's parameters and buffers: with check=False,
    disagreeing masks would be overwritten without a word, hence verify first."""
    if not isinstance(ddp, DDP):
        raise TypeError(f"ddp must be a DistributedDataParallel, got {type(ddp).__name__}")
    kwargs = {arg: getattr(ddp, attr) for attr, arg in _KEEP.items() if hasattr(ddp, attr)}
    if kwargs.get("device_ids") is None:
        kwargs.pop("device_ids", None)
        kwargs.pop("output_device", None)
    kwargs.update(overrides)
    if check:
        verify(ddp.module, kwargs.get("process_group"))
    install_stale_ddp_check()
    new = DDP(ddp.module, **kwargs)
    ddp._lori_stale = True
    return new


def switch_phase(ddp: DDP, switch_fn, *, check: bool = True, **overrides):
    """Run `switch_fn(ddp.module)` (e.g. calibrate_masks, LoRIModel.calibrate, to_sparse) and
    return (rebuilt DDP wrapper, what switch_fn returned). Every rank must call it."""
    result = switch_fn(ddp.module)
    return rebuild_ddp(ddp, check=check, **overrides), result


install_stale_ddp_check()

"""The one validation switch, for every backend (re-exported by lori_kernels.backends).

What is checked of the data kernels read on the device (adapter ids, each used adapter's value
extent, B's mask/offsets consistency), initialised from LORI_VALIDATE:
  "on"   (default) ids and extents checked, with at most one host sync per call on CUDA; B's
         contents checked for CPU tensors.
  "full" also B's mask/offsets consistency on CUDA (reads B back: syncs, slow; for debugging).
  "off"  no check that needs the device's data, no sync (e.g. for CUDA-graph capture, which
         also turns them off by itself): kernels stay memory-safe (ids out of range act as -1,
         extents are clamped) but raise nothing.
With a plan (the batched ops' plan_order / plan_starts / plan_adapters, docs/architecture.md
"The batched plan") "on" trusts the plan's grouping and skips the id checks (no sync); "full"
checks the plan against the ids in every call and raises on any disagreement.
The CUDA host code reads the same switch from the LORI_VALIDATE environment variable, which
set_validation keeps in step. Shape, dtype and device rules (lori_kernels.rules) always run.
"""
from __future__ import annotations

import contextlib
import os

import torch

VALIDATION = ("on", "full", "off")
_ALIASES = {"1": "on", "0": "off", "on": "on", "off": "off", "full": "full"}


def _parse(mode, source: str) -> str:
    v = _ALIASES.get(mode) if isinstance(mode, str) else None
    if v is None:
        raise ValueError(f"validation must be one of {VALIDATION} ({source}), got {mode!r}")
    return v


_validation = _parse(os.environ.get("LORI_VALIDATE", "on"), "LORI_VALIDATE")


def get_validation() -> str:
    return _validation


def set_validation(mode: str) -> str:
    """Set the validation level ("on", "full", "off"); returns the previous one."""
    global _validation
    prev = _validation
    _validation = _parse(mode, "set_validation")
    os.environ["LORI_VALIDATE"] = _validation
    return prev


@contextlib.contextmanager
def validation(mode: str):
    """`with validation("off"): ...` for a block (e.g. around CUDA-graph capture)."""
    prev = set_validation(mode)
    try:
        yield
    finally:
        set_validation(prev)


def validate_contents(device: torch.device) -> bool:
    """Whether B's mask/offsets consistency is checked for tensors on `device` (reads B)."""
    return _validation == "full" or (_validation == "on" and device.type == "cpu")


def validate_ids() -> bool:
    """Whether adapter ids and extents are checked (one host sync on CUDA)."""
    return _validation != "off"

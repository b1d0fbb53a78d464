"""Backends and shapes shared by the column-window and shrink/expand tests.

BACKENDS: (backend, device) pairs as pytest params: the C++ CPU kernels always; the Triton
kernels on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU) when
Triton imports; both on CUDA when a GPU exists. Absent ones skip with the reason.
"""
from __future__ import annotations

import contextlib

import pytest
import torch


def _triton_reason(device: str) -> str | None:
    try:
        from lori_kernels import triton as lt
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"lori_kernels.triton does not import: {e}"
    if not lt.available():
        return f"Triton kernels unavailable: {lt.import_error or 'no CUDA, no interpreter'}"
    if device == "cpu" and not lt.interpreted():
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return None


def _param(backend: str, device: str):
    reason = None
    if device == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device on this machine"
    elif backend == "triton":
        reason = _triton_reason(device)
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(backend, device, id=f"{backend}-{device}", marks=marks)


BACKENDS = [_param("cpp", "cpu"), _param("triton", "cpu"), _param("cpp", "cuda"),
            _param("triton", "cuda")]

ISAS = ["avx512", "avx2", "generic"]


def isa_available(level: str) -> bool:
    """Whether this CPU runs `level` (the level never rises above what the CPU has)."""
    from lori_kernels import ops
    ops.set_cpu_isa(level)
    return ops.set_cpu_isa("auto") == level


@contextlib.contextmanager
def cpu_isa(level: str | None):
    """Run the C++ CPU kernels capped at `level` (None: as detected); skips a level the CPU
    lacks."""
    from lori_kernels import ops
    if level is None:
        yield
        return
    if not isa_available(level):
        pytest.skip(f"this CPU has no {level} (its path cannot run here)")
    ops.set_cpu_isa(level)
    try:
        yield
    finally:
        ops.set_cpu_isa("auto")


# Cuts of a 300-wide A into column shards: starts that are not multiples of 4, 8, 64 or 128,
# a shard of width 1, and shards straddling Philox block edges (128 columns).
IN_FEATURES = 300
CUTS = [0, 37, 38, 129, 131, 256, 300]


def shards(cuts=CUTS):
    return list(zip(cuts[:-1], cuts[1:]))

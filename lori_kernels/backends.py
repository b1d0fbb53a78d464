"""The one backend router.

Backend of a call, in order: the call's `backend=` argument; else the process-wide choice
(`set_backend`, initialised once from the LORI_BACKEND environment variable at import); else
"auto". "auto" and "cpp" run the C++ kernels of the tensor's device (CPU tensors: C++, CUDA
tensors: CUDA); "triton" runs the Triton kernels (CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1 for tests). Every caller in the package (ops, the nn layers, merge, the pool
layer, the workflow) goes through `resolve`.

The validation switch (lori_kernels.validation) is re-exported here.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .validation import (VALIDATION, get_validation, set_validation, validate_contents,
                         validate_ids, validation)

BACKENDS = ("auto", "cpp", "triton")


def _parse_backend(choice, source: str) -> str:
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} ({source}), got {choice!r}")
    return choice


_backend = _parse_backend(os.environ.get("LORI_BACKEND", "auto"), "LORI_BACKEND")
_triton_checked = False  # Triton's availability is looked up once, on first use


def get_backend() -> str:
    """The process-wide backend choice ("auto", "cpp" or "triton")."""
    return _backend


def set_backend(backend: str | None) -> str:
    """Set the process-wide backend (None: back to LORI_BACKEND / "auto"); returns the
    previous choice. "triton" is checked to be runnable here at once."""
    global _backend
    prev = _backend
    new = (_parse_backend(os.environ.get("LORI_BACKEND", "auto"), "LORI_BACKEND")
           if backend is None else _parse_backend(backend, "set_backend"))
    if new == "triton":
        _triton_runnable(None)
    _backend = new
    return prev


@contextlib.contextmanager
def use_backend(backend: str | None):
    """`with use_backend("triton"): ...` sets the process-wide backend for the block."""
    prev = set_backend(backend)
    try:
        yield
    finally:
        set_backend(prev)


def _triton_runnable(device: torch.device | None) -> None:
    global _triton_checked
    from . import triton as lt  # registers the triton_* kernels (below this module)

    if not _triton_checked:
        if not lt.available():
            raise RuntimeError("backend='triton' but the Triton kernels are unavailable: "
                               f"{lt.import_error or 'no CUDA device and TRITON_INTERPRET unset'}")
        _triton_checked = True
    if device is not None and device.type != "cuda" and not lt.interpreted():
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set "
                           "before lori_kernels.triton is imported, for CPU tensors)")


def resolve(backend: str | None, device: torch.device) -> str:
    """'cpp' (C++/CUDA kernels) or 'triton' for a call on tensors of `device`."""
    # On every decode call: the common answer returns after two comparisons.
    choice = _backend if backend is None else backend
    if choice == "auto" or choice == "cpp":
        return "cpp"
    if choice != "triton":
        _parse_backend(choice, "argument")
    _triton_runnable(device)
    return "triton"


__all__ = ["BACKENDS", "VALIDATION", "get_backend", "get_validation", "resolve", "set_backend",
           "set_validation", "use_backend", "validate_contents", "validate_ids", "validation"]

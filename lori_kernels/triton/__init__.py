"""Triton backend of the lori ops (torch.ops.lori.triton_*), see lori_kernels/triton/ops.py.

Importing this package never fails for want of Triton: `available()` says whether the
kernels are registered and can run here. Kernels run on CUDA tensors, and on CPU tensors
under the Triton interpreter (TRITON_INTERPRET=1 set before this package is first imported).

Kernel layout (one file per concern):
  philox.py            Philox4x32-10 rounds (tl.umulhi), SWAR popcount, RNE casts
  random_a.py          A tiles from the seed (docs/spec_a.md) + random_a's fill kernel
  sparse_delta_fwd.py  forward: shrink (x -> h = x A^T, A per tile) + expand (h -> y, sparse B)
  sparse_delta_bwd.py  backward: gy B -> gh; gh A -> grad_x; (gy^T h)[pattern] -> grad_values
  merge_delta.py       merge_delta_: weight += scale * B A per (64-row chunk, column tile)
  batched_delta.py     many adapters per batch: tokens grouped by adapter on the device,
                       shrink/expand (and backward) over (segment tile, ...) work tables
  ops.py               registration (CPU/CUDA kernels, fake kernels, autograd)
"""
from __future__ import annotations

import_error: Exception | None = None  # why the kernels are not registered, if they are not
try:
    import triton as _triton  # noqa: F401
except ImportError as _e:  # pragma: no cover - only without triton
    import_error, ops = _e, None
else:
    try:
        from . import ops
    except Exception as _e:  # pragma: no cover - e.g. a Triton too old for these kernels
        import_error, ops = _e, None


def available() -> bool:
    """True when Triton is importable and the triton_* kernels can run in this process: a CUDA
    device is present, or the kernels were built for the interpreter (TRITON_INTERPRET=1).
    When the kernels could not be registered, `import_error` holds the reason."""
    if ops is None:
        return False
    if ops.INTERPRET:
        return True
    import torch
    return torch.cuda.is_available()


def interpreted() -> bool:
    """True when the kernels run under the Triton interpreter (CPU tensors allowed)."""
    return ops is not None and ops.INTERPRET


__all__ = ["available", "import_error", "interpreted"]

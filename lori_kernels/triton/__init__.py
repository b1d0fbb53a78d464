"""Triton backend of the lori ops (torch.ops.lori.triton_*), see lori_kernels/triton/ops.py.

Importing this package never fails for want of Triton: `available()` says whether the
kernels are registered and can run here. Kernels run on CUDA tensors, and on CPU tensors
under the Triton interpreter (TRITON_INTERPRET=1 set before this package is first imported).

Kernel layout (one file per concern; the op registration imports only the entry points):
  common.py            shared by every pass: Philox4x32-10 rounds (tl.umulhi), SWAR popcount,
                       RNE casts, the sparse-B tile decode (bounded by each chunk's offsets),
                       split reductions, masked tile loads, tile configs and splits, and the
                       `jit` decorator (no JIT variants for seed words, counts, loop bounds)
  random_a.py          A tiles from the seed (docs/spec_a.md) + random_a's fill kernel
  sparse_delta_fwd.py  forward: shrink (x -> h = x A^T, A per tile) + expand (h -> y, sparse B)
  sparse_delta_bwd.py  backward: gy B -> gh; gh A -> grad_x; (gy^T h)[pattern] -> grad_values
  merge_delta.py       merge_delta_: weight += scale * B A per (64-row chunk, column tile)
  grouping.py          many adapters per batch: tokens grouped by adapter on the device
                       (perm, segment and work tables), shared by both batched passes
  batched_delta.py     batched shrink/expand (and backward) over the grouping's tables
  variants.py          counts the JIT variants the kernels compile (LORI_TRITON_VARIANTS)
  ops.py               registration (CPU/CUDA kernels, fake kernels, autograd)
Dependency order: common <- random_a <- sparse_delta_fwd <- sparse_delta_bwd; common, random_a
<- merge_delta; common, random_a, grouping <- batched_delta; all of them <- ops.
The kernels compile under Triton 3.6 (the GPU machine's) and the pinned Triton:
`make gpu-precheck` compiles every kernel for sm_90 under both (tests/triton_compile_check.py).
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
    else:
        from . import variants as _variants
        _variants.install_from_env()


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

"""The GPU-sized subset of the Triton tests (`pytest --gpu-subset`, used by gpu_check.sh).

On a cold Triton cache every distinct JIT variant is a separate 0.4-2 s sm_90 compile, and the
full Triton suite launches ~170 of them (tests/test_triton_compile.py counts them). The subset
keeps every test function but trims the parametrizations that only multiply variants: fp16
runs in the tests about dtypes (same code as bf16 but the final cast), and the dtype x
distribution x token-count x shape grids keep one corner per concern (decode with one
distribution, prefill with the other). What is left still covers every
kernel, every dtype, both distributions, decode and prefill token counts, split reductions,
corrupt offsets, and the error paths.
"""
from __future__ import annotations

import torch


def _p(item) -> dict:
    cs = getattr(item, "callspec", None)
    return dict(cs.params) if cs is not None else {}


def keep(item) -> bool:
    """True when the test belongs to the GPU subset."""
    name = item.originalname if hasattr(item, "originalname") else item.name
    p = _p(item)
    dtype, dist, T = p.get("dtype"), p.get("dist"), p.get("T")
    shape = tuple(p.get("shape", ()))
    if dtype == torch.float16 and "dtypes" not in name:
        return False
    if name == "test_merge_delta_against_reference_and_cpp":
        return ((shape == (130, 129, 33) and dist == "rademacher" and dtype != torch.bfloat16)
                or (shape == (64, 257, 64) and dist == "uniform" and dtype == torch.bfloat16))
    if name in ("test_forward_tokens", "test_backward_against_reference"):
        # decode with one distribution, prefill with the other
        return T == 0 or (T == 1 and dist == "rademacher") or (T == 33 and dist == "uniform")
    if name == "test_random_a_bit_identical":
        return shape[:2] in ((33, 131), (17, 700)) or (shape[:2] == (1, 1) and dist == "uniform")
    if name == "test_backward_bounded_and_unwritten_slots_zero":
        return p.get("split") == 2
    if name == "test_forward_mixes":
        return T in (0, 513) or (T == 1 and p.get("mix") == "zipf64")
    return True


def select(items) -> tuple[list, list]:
    """(kept, deselected)."""
    kept, dropped = [], []
    for it in items:
        (kept if keep(it) else dropped).append(it)
    return kept, dropped

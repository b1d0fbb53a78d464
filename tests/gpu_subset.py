"""The GPU-sized subset of the Triton tests (`pytest --gpu-subset`, used by gpu_check.sh).

The op tests (tests/test_op_*.py) run on every backend: the subset keeps their "triton" cases
only, with tests/test_backend_triton.py and the other Triton files, and drops the CUDA
backend's file (those run in the check's own CUDA stages, `--backends cuda`).

On a cold Triton cache every distinct JIT variant is a separate 0.4-2 s sm_90 compile, and the
full Triton suite launches ~170 of them (lori_kernels/triton/variants.py counts them). The
subset drops the tests about API and shape variety (OFF_GPU), runs fp16 only where dtypes are
the point (same code as bf16 but the final cast), and keeps one corner per concern of the
dtype x distribution x token-count x shape grids (decode with one distribution, prefill with
the other). What is left still covers every kernel, every dtype, both distributions, decode
and prefill token counts, split reductions, corrupt offsets, and the error paths.
"""
from __future__ import annotations

import torch


def _p(item) -> dict:
    cs = getattr(item, "callspec", None)
    return dict(cs.params) if cs is not None else {}


def backend_of(item) -> str | None:
    """The backend an item tests: its `backend` parameter (tests/op_backends.py), else "cuda"
    or "triton" for tests/test_backend_<name>.py, else None (not a backend's test)."""
    b = _p(item).get("backend")
    if b is not None:
        return str(b)
    mod = getattr(getattr(item, "module", None), "__name__", "") or ""
    mod = mod.rsplit(".", 1)[-1]
    if mod.startswith("test_backend_"):
        return mod[len("test_backend_"):]
    return None


# Tests whose point is API or shape variety that the interpreter run already covers (views,
# 3-D inputs, torch.compile, opcheck, gradcheck on odd shapes, ranks): each brings JIT variants
# of its own and no GPU-specific code path.
OFF_GPU = {
    "test_forward_shapes_and_ranks", "test_forward_noncontiguous_and_3d",
    "test_forward_close_to_cpp", "test_backward_needs_input_grad", "test_torch_compile_fullgraph", "test_opcheck",
    "test_merge_opcheck", "test_merge_noncontiguous_weight_and_env_backend",
    "test_random_a_fill_noncontiguous_out", "test_opcheck_random_a_fill",
    "test_base_accumulate_3d_and_noncontiguous", "test_backward_long_segment_and_needs_input_grad",
    "test_shared_value_ranges_sum_their_gradients", "test_recorder_counts_variants_like_the_jit",
}


def keep(item) -> bool:
    """True when the test belongs to the GPU subset."""
    name = item.originalname if hasattr(item, "originalname") else item.name
    if backend_of(item) not in (None, "triton"):
        return False
    if name in OFF_GPU:
        return False
    p = _p(item)
    dtype, dist, T = p.get("dtype"), p.get("dist"), p.get("T")
    shape = tuple(p.get("shape", ()))
    if dtype == torch.float16 and "dtypes" not in name:
        return False
    if name in ("test_random_a_dtypes_round_like_cpp", "test_forward_dtypes"):
        return dtype in (torch.bfloat16, torch.float16) and dist != "uniform"
    if name == "test_merge_delta_against_reference_and_cpp":
        return ((shape == (130, 129, 33) and dist == "rademacher" and dtype != torch.bfloat16)
                or (shape == (64, 257, 64) and dist == "uniform" and dtype == torch.bfloat16))
    if name in ("test_forward_tokens", "test_backward_against_reference"):
        # decode with one distribution, prefill with the other
        return T == 0 or (T == 1 and dist == "rademacher") or (T == 33 and dist == "uniform")
    if name == "test_random_a_bit_identical":
        return shape[:2] in ((33, 131), (17, 700)) or (shape[:2] == (1, 1) and dist == "uniform")
    if name.startswith("test_") and "case" in p:  # corrupt offsets: two of the four cases
        if p["case"] not in ("chunk0_overruns", "negative_start"):
            return False
        return p.get("split", 2) == 2
    if name == "test_forward_mixes":
        return T in (0, 513) or (T == 1 and p.get("mix") == "zipf64")
    return True


def select(items) -> tuple[list, list]:
    """(kept, deselected)."""
    kept, dropped = [], []
    for it in items:
        (kept if keep(it) else dropped).append(it)
    return kept, dropped

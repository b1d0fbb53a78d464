"""The op surface: typed wrappers over torch.ops.lori.*, their fake kernels and autograd.

Schemas live in csrc/ops.cpp; kernels in csrc/cpu (and csrc/cuda, lori_kernels/triton).
"""
from __future__ import annotations

import os

import torch

from . import spec
from .packing import PackedB

try:
    from . import _C  # noqa: F401  (loading the .so registers torch.ops.lori.*)
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "lori_kernels._C is not built: run `make build` (or `pip install --no-build-isolation "
        f"-e .`) in the repository first ({e})"
    ) from e

_ops = torch.ops.lori


# os.environ.get of a missing key raises and catches a KeyError inside (~0.7 us, a few percent of
# a decode call); read CPython's backing dict directly when it has one (still live: os.environ
# writes go through it).
try:
    _ENV_DATA, _ENV_KEY = os.environ._data, os.environ.encodekey("LORI_BACKEND")  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - other Python implementations
    _ENV_DATA = None


def _env_backend() -> str:
    if _ENV_DATA is None:  # pragma: no cover
        return os.environ.get("LORI_BACKEND", "auto")
    v = _ENV_DATA.get(_ENV_KEY)
    return "auto" if v is None else os.environ.decodevalue(v)  # type: ignore[attr-defined]


# ---- fake kernels (shapes only; used by torch.compile and opcheck) ---------------------------

def _check_delta_fake(x, mask, values, offsets, rank):
    torch._check(x.dim() >= 1, lambda: "sparse_delta: x must have at least 1 dimension")
    for name, t in (("mask", mask), ("values", values), ("offsets", offsets)):
        torch._check(t.device == x.device,
                     lambda: f"sparse_delta: {name} is on {t.device} but x is on {x.device}")
    torch._check(1 <= rank <= spec.MAX_RANK, lambda: f"sparse_delta: rank out of range: {rank}")
    torch._check(mask.dim() == 2 and mask.shape[1] == spec.mask_words(rank),
                 lambda: "sparse_delta: mask must have shape (out_features, ceil(rank/32))")
    torch._check(mask.dtype == torch.int32, lambda: "sparse_delta: mask must be int32")
    torch._check(values.dtype == x.dtype, lambda: "sparse_delta: values dtype must match x")
    torch._check(values.dim() == 1, lambda: "sparse_delta: values must be 1-D")
    torch._check(offsets.dtype == torch.int32, lambda: "sparse_delta: offsets must be int32")
    torch._check(offsets.dim() == 1 and offsets.shape[0] == spec.num_chunks(mask.shape[0]) + 1,
                 lambda: "sparse_delta: offsets must have shape (ceil(out_features/64)+1,)")


@torch.library.register_fake("lori::sparse_delta")
def _sparse_delta_fake(x, mask, values, offsets, rank, seed, distribution, scale):
    _check_delta_fake(x, mask, values, offsets, rank)
    return x.new_empty((*x.shape[:-1], mask.shape[0]))


@torch.library.register_fake("lori::sparse_delta_fwd")
def _sparse_delta_fwd_fake(x, mask, values, offsets, rank, seed, distribution, scale):
    _check_delta_fake(x, mask, values, offsets, rank)
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    hdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty((*x.shape[:-1], mask.shape[0])),
            x.new_empty((tokens, rank), dtype=hdtype))


@torch.library.register_fake("lori::sparse_delta_backward")
def _sparse_delta_backward_fake(grad_y, x, mask, values, offsets, rank, seed, distribution,
                                scale, need_x, need_values, h=None):
    _check_delta_fake(x, mask, values, offsets, rank)
    torch._check(grad_y.shape == (*x.shape[:-1], mask.shape[0]),
                 lambda: "sparse_delta_backward: grad_y shape mismatch")
    gx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
    gv = values.new_empty(values.shape) if need_values else values.new_empty((0,))
    return gx, gv


@torch.library.register_fake("lori::random_a")
def _random_a_fake(seed, rank, in_features, distribution="rademacher", col_start=0, col_end=-1,
                   *, dtype=None, device=None):
    end = in_features if col_end < 0 else col_end
    return torch.empty((rank, end - col_start), dtype=dtype or torch.float32,
                       device=device or "cpu")


@torch.library.register_fake("lori::_random_a_fill")
def _random_a_fill_fake(out, seed, in_features, col_start, distribution):
    return None


@torch.library.register_fake("lori::philox4x32_10")
def _philox_fake(counters, seed):
    return torch.empty_like(counters)


# ---- autograd -------------------------------------------------------------------------------
# sparse_delta's autograd is registered in C++ (csrc/autograd.cpp): a Python autograd kernel
# costs ~6 us per call, a large share of a decode step. Its backward calls the registered op
# lori::sparse_delta_backward, which has the fake kernel above, so torch.compile traces it.


# ---- backend choice ---------------------------------------------------------------------------
BACKENDS = ("auto", "cpp", "triton")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """'cpp' (C++/CUDA kernels) or 'triton' for tensors on `device`.

    Order: the argument, then the LORI_BACKEND environment variable, then 'auto' (the C++
    kernel of the tensor's device: CPU tensors run C++, CUDA tensors run CUDA).
    Triton on CPU tensors works only under TRITON_INTERPRET=1 (for tests)."""
    # On every decode call: the common answers return before anything costlier than a lookup.
    choice = backend if backend is not None else _env_backend()
    if choice == "auto" or choice == "cpp":
        return "cpp"
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (argument or LORI_BACKEND), "
                         f"got {choice!r}")
    if choice != "triton":
        return "cpp"
    from . import triton as lt  # lazy: lori_kernels.triton imports this module

    if not lt.available():
        raise RuntimeError(f"backend='triton' but the Triton kernels are unavailable: "
                           f"{lt.import_error}")
    if device.type != "cuda" and not lt.interpreted():
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for "
                           "CPU tensors)")
    return "triton"


# ---- typed public wrappers --------------------------------------------------------------------

def random_a(seed: int, rank: int, in_features: int, *, distribution: str = spec.DEFAULT_DISTRIBUTION,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             columns: tuple[int, int] | None = None, backend: str | None = None) -> torch.Tensor:
    """Materialize A (rank, in_features), or its column slice A[:, c0:c1] with columns=(c0, c1),
    from a 64-bit seed, bit-identically on every backend (docs/spec_a.md).

    A's entries are fp32 values rounded once (round-to-nearest-even) to `dtype`.
    backend: None/'auto'/'cpp'/'triton' (see resolve_backend).
    """
    seed_i64 = spec.check_seed(seed)
    spec.check_distribution(distribution)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    c0, c1 = (0, in_features) if columns is None else columns
    if not 0 <= c0 <= c1 <= in_features:
        raise ValueError(f"columns must satisfy 0 <= c0 <= c1 <= in_features={in_features}, "
                         f"got {columns!r}")
    device = torch.device(device)
    if resolve_backend(backend, device) == "triton":
        out = torch.empty((rank, c1 - c0), dtype=dtype, device=device)
        _ops.triton_random_a_fill(out, seed_i64, in_features, c0, distribution)
        return out
    return _ops.random_a(seed_i64, rank, in_features, distribution, c0, c1, dtype=dtype,
                         device=device)


def sparse_delta(x: torch.Tensor, b: PackedB, *, seed: int,
                 distribution: str = spec.DEFAULT_DISTRIBUTION, scale: float = 1.0,
                 backend: str | None = None) -> torch.Tensor:
    """LoRI delta: y = scale * (x @ A^T) @ B^T, x of shape (..., in_features).

    A (b.rank, in_features) is regenerated inside the kernel from (seed, distribution) and never
    materialized beyond a tile; B (out_features, rank) is read in its bitmask form. Gradients
    flow to x and to b.values (only the pattern's entries); A gets none.
    backend: None/'auto'/'cpp'/'triton' (see resolve_backend).
    """
    if not isinstance(b, PackedB):
        raise TypeError(f"b must be a PackedB (see lori_kernels.pack_bitmask), got {type(b).__name__}")
    seed_i64 = spec.check_seed(seed)
    spec.check_distribution(distribution)
    op = _ops.triton_sparse_delta if resolve_backend(backend, x.device) == "triton" else _ops.sparse_delta
    return op(x, b.mask, b.values, b.offsets, b.rank, seed_i64, distribution, float(scale))


@torch.library.register_fake("lori::merge_delta_")
def _merge_delta_fake(weight, mask, values, offsets, rank, seed, distribution, scale):
    torch._check(weight.dim() == 2 and weight.shape[0] == mask.shape[0],
                 lambda: "merge_delta_: weight must be (out_features, in_features)")
    return None


def merge_delta_(weight: torch.Tensor, b: PackedB, *, seed: int,
                 distribution: str = spec.DEFAULT_DISTRIBUTION, scale: float = 1.0,
                 backend: str | None = None) -> torch.Tensor:
    """In place: weight (out_features, in_features) += scale * B @ A, A generated per column
    tile (never whole). Unmerge with -scale. Returns weight.
    backend: None/'auto'/'cpp'/'triton' (see resolve_backend)."""
    if not isinstance(b, PackedB):
        raise TypeError(f"b must be a PackedB, got {type(b).__name__}")
    seed_i64 = spec.check_seed(seed)
    spec.check_distribution(distribution)
    op = (_ops.triton_merge_delta_ if resolve_backend(backend, weight.device) == "triton"
          else _ops.merge_delta_)
    with torch.no_grad():
        op(weight, b.mask, b.values, b.offsets, b.rank, seed_i64, distribution, float(scale))
    return weight


# ==== batched multi-adapter ops (issue 4) =====================================================
# torch.ops.lori.batched_sparse_delta: many adapters of one AdapterPool in one batch, tokens
# grouped by adapter inside the kernel. Autograd is registered in C++
# (csrc/autograd_batched.cpp); its backward is lori::batched_sparse_delta_backward.

def _check_batched_fake(op, x, adapter_ids, masks, values, value_starts, offsets, seeds, scales,
                        distributions, rank):
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least 1 dimension")
    for name, t in (("adapter_ids", adapter_ids), ("masks", masks), ("values", values),
                    ("value_starts", value_starts), ("offsets", offsets), ("seeds", seeds),
                    ("scales", scales), ("distributions", distributions)):
        torch._check(t.device == x.device,
                     lambda: f"{op}: {name} is on {t.device} but x is on {x.device}")
    torch._check(1 <= rank <= spec.MAX_RANK, lambda: f"{op}: rank out of range: {rank}")
    torch._check(adapter_ids.dtype in (torch.int32, torch.int64),
                 lambda: f"{op}: adapter_ids must be int32 or int64")
    torch._check(adapter_ids.dim() == 1 and adapter_ids.shape[0] * x.shape[-1] == x.numel(),
                 lambda: f"{op}: adapter_ids must have shape (tokens,)")
    torch._check(masks.dtype == torch.int32 and masks.dim() == 3
                 and masks.shape[2] == spec.mask_words(rank),
                 lambda: f"{op}: masks must be int32 (adapters, out_features, ceil(rank/32))")
    n, out = masks.shape[0], masks.shape[1]
    torch._check(values.dtype == x.dtype and values.dim() == 1,
                 lambda: f"{op}: values must be 1-D in x's dtype")
    torch._check(offsets.dtype == torch.int32 and offsets.dim() == 2
                 and offsets.shape[0] == n and offsets.shape[1] == spec.num_chunks(out) + 1,
                 lambda: f"{op}: offsets must be int32 (adapters, ceil(out_features/64)+1)")
    for name, t, dt in (("value_starts", value_starts, torch.int64), ("seeds", seeds, torch.int64),
                        ("scales", scales, torch.float32),
                        ("distributions", distributions, torch.int32)):
        torch._check(t.dtype == dt and t.dim() == 1 and t.shape[0] == n,
                     lambda: f"{op}: {name} must be {dt} of shape (adapters,)")


@torch.library.register_fake("lori::batched_sparse_delta")
def _batched_sparse_delta_fake(x, adapter_ids, masks, values, value_starts, offsets, seeds,
                               scales, distributions, rank, base=None):
    _check_batched_fake("batched_sparse_delta", x, adapter_ids, masks, values, value_starts,
                        offsets, seeds, scales, distributions, rank)
    shape = (*x.shape[:-1], masks.shape[1])
    if base is not None:
        torch._check(base.shape == shape and base.dtype == x.dtype,
                     lambda: "batched_sparse_delta: base must match (..., out_features), x dtype")
    return x.new_empty(shape)


@torch.library.register_fake("lori::batched_sparse_delta_backward")
def _batched_sparse_delta_backward_fake(grad_y, x, adapter_ids, masks, values, value_starts,
                                        offsets, seeds, scales, distributions, rank, need_x,
                                        need_values):
    _check_batched_fake("batched_sparse_delta_backward", x, adapter_ids, masks, values,
                        value_starts, offsets, seeds, scales, distributions, rank)
    torch._check(grad_y.shape == (*x.shape[:-1], masks.shape[1]),
                 lambda: "batched_sparse_delta_backward: grad_y shape mismatch")
    gx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
    gv = values.new_empty(values.shape) if need_values else values.new_empty((0,))
    return gx, gv


def batched_sparse_delta(x: torch.Tensor, adapter_ids, pool, *,
                         base: torch.Tensor | None = None,
                         backend: str | None = None) -> torch.Tensor:
    """Many LoRI adapters of one AdapterPool in one batch (punica BGMV semantics):

        y[t] = base[t] + scale_a * (x[t] @ A_a^T) @ B_a^T,   a = adapter_ids[t]

    with a == -1 meaning no adapter (y[t] = base[t], or 0 without base). x is
    (..., in_features); adapter_ids holds one id per token (a tensor of slot indices, or a
    sequence of adapter names / slot indices / None, resolved by pool.ids). Inside, tokens are
    grouped by adapter, so each adapter's A is generated once per batch, not once per token.
    `base` (shape (..., out_features), x's dtype) is the accumulate form: base + delta,
    rounded once. Gradients flow to x, base and pool.values (every used adapter's B entries).
    pool.values must be in x's dtype, else it is converted on every call.
    backend: None/'auto'/'cpp'/'triton' (see resolve_backend). The Triton op checks the ids on
    the device and reads the result back once (one sync; LORI_TRITON_BATCHED_CHECKS=0 skips it).
    """
    from .pool import AdapterPool
    if not isinstance(pool, AdapterPool):
        raise TypeError(f"pool must be an AdapterPool, got {type(pool).__name__}")
    if x.shape[-1] != pool.in_features:
        raise ValueError(f"x has {x.shape[-1]} features but the pool's adapters take "
                         f"in_features={pool.in_features}")
    ids = adapter_ids if isinstance(adapter_ids, torch.Tensor) else pool.ids(adapter_ids)
    masks, values, starts, offsets, seeds, scales, dists, rank = pool.op_args()
    if values.dtype != x.dtype:
        values = values.to(x.dtype)
    op = (_ops.triton_batched_sparse_delta if resolve_backend(backend, x.device) == "triton"
          else _ops.batched_sparse_delta)
    return op(x, ids.reshape(-1), masks, values, starts, offsets, seeds, scales, dists, rank, base)

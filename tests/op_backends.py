"""The backends an op test runs on: "cpu" (the C++ kernels on CPU tensors), "triton" (the
Triton kernels: on the GPU when there is one, else on CPU tensors under TRITON_INTERPRET=1,
which tests/conftest.py sets before triton is imported) and "cuda" (the C++ CUDA kernels).

A test takes a `backend` parameter made by backends(...) or cases(...): a Backend, which is
the backend's name as a str (so `backend == "cuda"` and pytest ids read as usual) that also
knows its device, its raw ops and how to move tensors, PackedB and pools there. A backend the
machine cannot run is collected and skipped with the reason.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lori_kernels  # noqa: E402,F401  (registers torch.ops.lori)
import lori_kernels as L  # noqa: E402
from lori_kernels import reference, spec  # noqa: E402
from lori_kernels.packing import PackedB  # noqa: E402
from lori_kernels.testing import (assert_within_rule, baseline_grads,  # noqa: E402
                                  dense_lora_baseline, reference_grads)

HAS_CUDA = torch.cuda.is_available()
ALL = ("cpu", "triton", "cuda")


def _triton_skip_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    import lori_kernels.triton as LT
    if LT.import_error is not None and not isinstance(LT.import_error, ImportError):
        raise LT.import_error  # a bug in the backend, not a missing dependency
    if not LT.available():
        return "Triton kernels cannot run here (no CUDA and not built for TRITON_INTERPRET=1)"
    return None


TRITON_SKIP = _triton_skip_reason()
SKIP = {"cpu": None, "triton": TRITON_SKIP, "cuda": None if HAS_CUDA else "no CUDA device"}


class Backend(str):
    """A backend's name with what a test needs to run an op there."""

    @property
    def device(self) -> str:
        if self == "cpu":
            return "cpu"
        if self == "cuda":
            return "cuda"
        return "cuda" if HAS_CUDA else "cpu"  # triton

    @property
    def route(self) -> str:
        """The lori_kernels.backends key of the public wrappers (backend=...)."""
        return "triton" if self == "triton" else "cpp"

    def op(self, name: str):
        """The raw op torch.ops.lori.<name> (triton_<name> for Triton; _random_a_fill is
        triton_random_a_fill there)."""
        if self == "triton":
            name = "triton_" + name.lstrip("_")
        return getattr(torch.ops.lori, name)

    def to(self, obj):
        """A copy (never an alias, also on the CPU) of a tensor, PackedB or AdapterPool on
        this backend's device."""
        dev = self.device
        if isinstance(obj, torch.Tensor):
            return obj.detach().clone().to(dev).requires_grad_(obj.requires_grad)
        if isinstance(obj, PackedB):
            return PackedB(self.to(obj.mask), self.to(obj.values), self.to(obj.offsets), obj.rank)
        return copy_pool(obj, dev)  # an AdapterPool (its .to moves it in place)

    def on(self, t: torch.Tensor) -> torch.Tensor:
        """t itself when it is on this backend's device already (views keep their strides),
        else a copy there."""
        return t if t.device.type == torch.device(self.device).type else t.to(self.device)

    def sparse_delta(self, x, b, seed, dist, scale, values=None):
        """The raw forward op on b (already on the device) and x."""
        v = b.values if values is None else values
        return self.op("sparse_delta")(x, b.mask, v, b.offsets, b.rank, spec.check_seed(seed),
                                       dist, scale)

    def sparse_delta_backward(self, *args):
        return self.op("sparse_delta_backward")(*args)

    def random_a_fill(self, out, seed, in_features, c0, dist):
        return self.op("_random_a_fill")(out, spec.check_seed(seed), in_features, c0, dist)

    def merge_delta_(self, *args):
        return self.op("merge_delta_")(*args)

    def batched(self, *args):
        return self.op("batched_sparse_delta")(*args)

    def batched_backward(self, *args):
        return self.op("batched_sparse_delta_backward")(*args)

    def batched_args(self, pool):
        """pool.op_args() on the device (pool: a CPU AdapterPool; the result shares nothing)."""
        return [self.to(t) if isinstance(t, torch.Tensor) else t for t in pool.op_args()]


def copy_pool(pool, device) -> "L.AdapterPool":
    """The same adapters in the same slots, in a new pool on device (an AdapterPool holds a
    lock, so it cannot be deep-copied; its .to moves it in place)."""
    new = L.AdapterPool(pool.in_features, pool.out_features, pool.rank, dtype=pool.dtype,
                        capacity=pool.capacity)
    for slot, name in enumerate(pool._names):
        if name is None:  # free slots at the end only (asserted by the slot check below)
            continue
        e = pool.get(name)
        assert new.add(name, e.packed, seed=e.seed, distribution=e.distribution,
                       scale=e.scale) == slot, "copy_pool: a free slot before a live one"
    return new.to(device)


def _marks(name: str):
    reason = SKIP[name]
    return [pytest.mark.skip(reason=reason)] if reason else []


def backends(*names: str) -> list:
    """pytest.param per backend (default: all), skipped with the reason where it cannot run."""
    return [pytest.param(Backend(n), marks=_marks(n), id=n) for n in (names or ALL)]


def cases(table: dict[str, list]) -> list:
    """Per-backend parameter rows: {backend: [row, ...]} -> pytest.param(backend, *row). Each
    backend keeps its own shape set (the Triton interpreter needs small ones)."""
    out = []
    for name, rows in table.items():
        for row in rows:
            row = row if isinstance(row, tuple) else (row,)
            out.append(pytest.param(Backend(name), *row, marks=_marks(name)))
    return out


# ---- sparse_delta checks shared by the op and backend files ------------------------------------

def _on(backend, t):
    """t on the backend's device (t itself when it is there already: views keep their
    strides)."""
    return t if t.device.type == torch.device(backend.device).type else t.to(backend.device)


def check_forward(backend, x, b, seed, dist, scale, what=""):
    """The public wrapper on the backend (x on the CPU or already on the device) against the
    float64 reference, within the tolerance rule; references run on the CPU."""
    xd = _on(backend, x)
    y = L.sparse_delta(xd, backend.to(b), seed=seed, distribution=dist, scale=scale,
                       backend=backend.route)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], b.out_features), what
    assert y.device.type == torch.device(backend.device).type, what
    xc = x.cpu()
    ref = reference.sparse_delta(xc, b.to_dense(), seed, dist, scale)
    assert_within_rule(y.cpu(), ref, dense_lora_baseline(xc, b, seed, dist, scale), what)
    return y


def check_backward(backend, x, b, seed, dist, scale, what=""):
    """Autograd through the backend's op vs the float64 reference's gradients (rule)."""
    g = torch.Generator().manual_seed(x.shape[0])
    xd = backend.to(x).requires_grad_()
    bd = backend.to(b)
    values = bd.values.clone().requires_grad_()
    y = backend.sparse_delta(xd, bd, seed, dist, scale, values=values)
    gy = torch.randn(y.shape, generator=g).to(x.dtype)
    y.backward(gy.to(backend.device))
    rgx, rgv = reference_grads(x, b, seed, dist, scale, gy)
    bgx, bgv = baseline_grads(x, b, seed, dist, scale, gy)
    assert xd.grad.dtype == x.dtype and values.grad.dtype == b.values.dtype
    assert_within_rule(xd.grad.cpu(), rgx, bgx, f"grad_x {what}")
    assert_within_rule(values.grad.cpu(), rgv, bgv, f"grad_values {what}")


def pytest_id(v):
    """ids= for parametrize: dtypes, numbers, strings and tuples of them read as themselves;
    anything else gets pytest's default id."""
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, (bool, int, float, str)):
        return str(v)
    if isinstance(v, tuple) and all(isinstance(e, (int, str)) for e in v):
        return "x".join(map(str, v))
    return None


__all__ = ["ALL", "Backend", "HAS_CUDA", "L", "SKIP", "TRITON_SKIP", "backends", "cases",
           "check_backward", "check_forward", "pytest_id"]

"""Test helpers shared by tests/ and benchmarks/: random B patterns and the tolerance rule."""
from __future__ import annotations

import torch

from . import reference
from .packing import PackedB, pack_bitmask


def random_packed(out_features: int, rank: int, density: float = 0.1, dtype=torch.float32,
                  generator: torch.Generator | None = None, mask: str = "random") -> PackedB:
    """B with a random pattern of the given density (mask='random'), or all-zero/all-one masks.
    Values on the mask are N(0, 1), so some pattern entries could be anything, including 0."""
    b = torch.randn(out_features, rank, generator=generator, dtype=torch.float32)
    if mask == "zeros":
        m = torch.zeros(out_features, rank, dtype=torch.bool)
    elif mask == "ones":
        m = torch.ones(out_features, rank, dtype=torch.bool)
    else:
        m = torch.rand(out_features, rank, generator=generator) < density
    return pack_bitmask(b.to(dtype), mask=m)


def tolerance_bound(ref64: torch.Tensor, baseline: torch.Tensor) -> float:
    """The tolerance rule: a kernel may err vs the float64 reference by at most
    2 x (plain torch's error in the same dtype) + 4 eps(dtype) max|ref|."""
    base_err = ((baseline.double().to(ref64.device) - ref64).abs().max().item()
                if ref64.numel() else 0.0)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    return 2.0 * base_err + 4.0 * torch.finfo(baseline.dtype).eps * scale + 1e-30


def assert_within_rule(out: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor,
                       what: str = "") -> None:
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if out.numel() == 0:
        return
    err = (out.double().to(ref64.device) - ref64).abs().max().item()
    bound = tolerance_bound(ref64, baseline)
    assert err <= bound, f"{what}: error {err:.3e} exceeds bound {bound:.3e}"


def dense_lora_baseline(x: torch.Tensor, b: PackedB, seed: int, distribution: str,
                        scale: float) -> torch.Tensor:
    """Plain torch in x's dtype, A and B dense: the error yardstick of the tolerance rule."""
    a = reference.random_a(seed, b.rank, x.shape[-1], distribution, dtype=x.dtype).to(x.device)
    return reference.dense_lora(x, a, b.to_dense().to(device=x.device, dtype=x.dtype), scale)


def reference_grads(x, b: PackedB, seed: int, distribution: str, scale: float, gy):
    """Autograd of the float64 reference w.r.t. x and B's packed values (computed on the CPU)."""
    x64 = x.detach().double().cpu().requires_grad_()
    v64 = b.values.detach().double().cpu().requires_grad_()
    dense = torch.zeros(b.out_features, b.rank, dtype=torch.float64).masked_scatter(
        b.bool_mask().cpu(), v64)
    reference.sparse_delta(x64, dense, seed, distribution, scale).backward(gy.detach().double().cpu())
    return x64.grad, v64.grad


def baseline_grads(x, b: PackedB, seed: int, distribution: str, scale: float, gy):
    """The same gradients from plain torch in x's dtype and device (the tolerance yardstick)."""
    xd = x.detach().clone().requires_grad_()
    vd = b.values.detach().clone().requires_grad_()
    dense = torch.zeros(b.out_features, b.rank, dtype=x.dtype, device=x.device).masked_scatter(
        b.bool_mask(), vd)
    a = reference.random_a(seed, b.rank, x.shape[-1], distribution, dtype=x.dtype).to(x.device)
    reference.dense_lora(xd, a, dense, scale).backward(gy)
    return xd.grad, vd.grad


def bad_delta_arguments(device="cpu"):
    """(mutate, exception, message) cases for sparse_delta-like ops whose arguments are
    [x, mask, values, offsets, rank, seed, distribution, scale]: every backend must raise the
    same clear error naming the argument."""
    return [
        (lambda a: a.__setitem__(0, a[0].to(torch.int32)), TypeError, "x must be float"),
        (lambda a: a.__setitem__(0, a[0].double()), TypeError, "values dtype"),
        (lambda a: a.__setitem__(1, a[1].to(torch.int64)), TypeError, "mask must be int32"),
        (lambda a: a.__setitem__(1, a[1][:, :0]), ValueError, "mask must have shape"),
        (lambda a: a.__setitem__(2, a[2][:-1]), ValueError, "values has"),
        (lambda a: a.__setitem__(2, a[2].reshape(1, -1)), ValueError, "values must be 1-D"),
        (lambda a: a.__setitem__(3, a[3][:-1]), ValueError, "offsets must have shape"),
        (lambda a: a.__setitem__(3, a[3].to(torch.int64)), TypeError, "offsets must be int32"),
        (lambda a: a.__setitem__(4, 300), ValueError, "rank must be in"),
        (lambda a: a.__setitem__(4, 0), ValueError, "rank must be in"),
        (lambda a: a.__setitem__(4, 40), ValueError, "mask must have shape"),
        (lambda a: a.__setitem__(6, "normal"), ValueError, "distribution"),
        (lambda a: a.__setitem__(0, torch.randn(3, 0, device=device)), ValueError, "in_features"),
        (lambda a: a.__setitem__(0, torch.tensor(1.0, device=device)), ValueError,
         "at least 1 dimension"),
    ]


def check_compile_fullgraph(f, x: torch.Tensor, v: torch.Tensor) -> None:
    """f(x, v) (a scalar; v an op's values) compiled with fullgraph=True on the aot_eager
    backend gives eager's value and gradients for x and v. x and v become leaves that require
    grad."""
    x, v = x.requires_grad_(), v.requires_grad_()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, v)
    out.backward()
    x2, v2 = x.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    ref = f(x2, v2)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(v.grad, v2.grad)

"""The two stages of sparse_delta as ops: shrink (h = x @ A_window^T, fp32 / fp64, no scale)
and expand (y = scale * h @ B^T in values' dtype), with their backwards, on every backend
(tests/window_cases.py): against the float64 reference within the tolerance rule, composed
(expand(shrink(x)) is sparse_delta), the h route of a row-parallel layer (sum of the shards' h,
then one expand, equals the unsharded result), float64 gradcheck, opcheck, and errors that
name the argument."""
import pytest
import torch

import lori_kernels as L
from lori_kernels import ops, reference
from lori_kernels._library import ops as lori
from lori_kernels.testing import (assert_within_rule, dense_lora_baseline, random_packed,
                                  tolerance_bound)
from window_cases import BACKENDS, IN_FEATURES, ISAS, cpu_isa, shards

SEED = 77
DISTS = ["rademacher", "uniform"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _b(out, rank, dtype=torch.float32, device="cpu", seed=3, density=0.3):
    b = random_packed(out, rank, density=density, dtype=dtype, generator=_gen(seed))
    return b if device == "cpu" else b.to(device)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (5,), (2, 9), (40,)])
def test_shrink_and_expand_match_reference(backend, device, dist, dtype, shape):
    rank, out, c0, width = 12, 70, 37, 200
    x = torch.randn(*shape, width, generator=_gen(1)).to(dtype)
    b = _b(out, rank, dtype=dtype)
    h = ops.shrink(x.to(device), rank=rank, seed=SEED, distribution=dist, col_start=c0,
                   in_features=IN_FEATURES, backend=backend)
    assert h.shape == (*shape, rank) and h.dtype == _acc(dtype)
    a = reference.random_a(SEED, rank, IN_FEATURES, dist, dtype=dtype, col_start=c0,
                           col_end=c0 + width)
    href = reference.shrink(x, rank, SEED, dist, c0, IN_FEATURES)
    assert_within_rule(h.cpu(), href, torch.nn.functional.linear(x, a), "h")
    hin = href.to(_acc(dtype))
    y = ops.expand(hin.to(device), b.to(device) if device != "cpu" else b, scale=0.5,
                   backend=backend)
    assert y.shape == (*shape, out) and y.dtype == dtype
    yref = reference.expand(hin, b.to_dense().double(), 0.5)
    assert_within_rule(y.cpu(), yref, (hin.to(dtype) @ b.to_dense().T) * 0.5, "y")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("T", [1, 3, 7, 30])
def test_cpu_isa_paths_shrink_expand(isa, dist, T):
    rank, out = 20, 65
    b = _b(out, rank, seed=4)
    x = torch.randn(T, 131, generator=_gen(T))
    with cpu_isa(isa):
        h = ops.shrink(x, rank=rank, seed=SEED, distribution=dist, col_start=129,
                       in_features=IN_FEATURES)
        a = reference.random_a(SEED, rank, IN_FEATURES, dist, col_start=129, col_end=260)
        assert_within_rule(h, reference.shrink(x, rank, SEED, dist, 129, IN_FEATURES),
                           torch.nn.functional.linear(x, a), "h")
        y = ops.expand(h, b, scale=1.25)
        assert_within_rule(y, reference.expand(h, b.to_dense(), 1.25),
                           (h @ b.to_dense().T) * 1.25, "y")
        gy = torch.randn(T, out, generator=_gen(9))
        gh, gv = ops.expand_backward(gy, h, b.mask, b.values, b.offsets, 1.25, True, True)
        gd = b.to_dense().double()
        torch.testing.assert_close(gh.double(), 1.25 * gy.double() @ gd, rtol=1e-5, atol=1e-5)
        gb = 1.25 * gy.double().T @ h.double()
        torch.testing.assert_close(gv.double(), gb[b.bool_mask()], rtol=1e-5, atol=1e-5)
        gx = ops.shrink_backward(gh, 131, torch.float32, rank, SEED, dist, 129, IN_FEATURES)
        torch.testing.assert_close(gx.double(), gh.double() @ a.double(), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("T", [1, 6, 33])
def test_expand_of_shrink_is_sparse_delta_and_the_h_route_sums(backend, device, dist, T):
    """The row-parallel h route: each shard's h, summed (the all-reduce), one expand with the
    whole B: the unsharded sparse_delta within the rule."""
    rank, out = 10, 40
    b = _b(out, rank, device=device)
    x = torch.randn(T, IN_FEATURES, generator=_gen(5)).to(device)
    y_fused = ops.sparse_delta(x, b, seed=SEED, distribution=dist, scale=2.0, backend=backend)
    y_staged = ops.expand(ops.shrink(x, rank=rank, seed=SEED, distribution=dist,
                                     backend=backend), b, scale=2.0, backend=backend)
    ref = reference.sparse_delta(x.cpu(), b.to_dense().double().cpu(), SEED, dist, 2.0)
    base = dense_lora_baseline(x.cpu(), b.to("cpu"), SEED, dist, 2.0)
    assert_within_rule(y_staged.cpu(), ref, base, "staged")
    assert_within_rule(y_fused.cpu(), ref, base, "fused")
    h = sum(ops.shrink(x[:, c0:c1], rank=rank, seed=SEED, distribution=dist, col_start=c0,
                       in_features=IN_FEATURES, backend=backend) for c0, c1 in shards())
    y_route = ops.expand(h, b, scale=2.0, backend=backend)
    bound = len(shards()) * tolerance_bound(ref, base)
    assert (y_route.double().cpu() - ref).abs().max().item() <= bound


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dist", DISTS)
def test_gradcheck_shrink_and_expand(backend, device, dist):
    rank, out = 5, 9
    b = _b(out, rank, dtype=torch.float64, device=device, density=0.5)
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=_gen(1)).to(device)
    x.requires_grad_()
    h = torch.randn(4, rank, dtype=torch.float64, generator=_gen(2)).to(device)
    h.requires_grad_()
    v = b.values.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: ops._shrink(x, rank, SEED, dist, 11, 40, backend), (x,))
    assert torch.autograd.gradcheck(
        lambda h, v: ops._expand(h, b.mask, v, b.offsets, 0.6, backend), (h, v))
    # Composed: the row-parallel layer's graph, gradients to x and values.
    assert torch.autograd.gradcheck(
        lambda x, v: ops._expand(ops._shrink(x, rank, SEED, dist, 11, 40, backend), b.mask, v,
                                 b.offsets, 0.6, backend), (x, v))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_float32_gradients_match_reference(backend, device):
    rank, out, T = 8, 30, 5
    b = _b(out, rank, device=device)
    x = torch.randn(T, 50, generator=_gen(3)).to(device).requires_grad_()
    v = b.values.clone().requires_grad_()
    y = ops._expand(ops._shrink(x, rank, SEED, "uniform", 3, 90, backend), b.mask, v,
                    b.offsets, 0.5, backend)
    gy = torch.randn(T, out, generator=_gen(4)).to(device)
    y.backward(gy)
    x64 = x.detach().double().cpu().requires_grad_()
    v64 = b.values.detach().double().cpu().requires_grad_()
    dense = torch.zeros(out, rank, dtype=torch.float64).masked_scatter(b.bool_mask().cpu(), v64)
    reference.sparse_delta(x64, dense, SEED, "uniform", 0.5, col_start=3,
                           in_features=90).backward(gy.double().cpu())
    xd = x.detach().cpu().clone().requires_grad_()
    vd = b.values.detach().cpu().clone().requires_grad_()
    dd = torch.zeros(out, rank).masked_scatter(b.bool_mask().cpu(), vd)
    a = reference.random_a(SEED, rank, 90, "uniform", col_start=3, col_end=53)
    reference.dense_lora(xd, a, dd, 0.5).backward(gy.cpu())
    assert_within_rule(x.grad.cpu(), x64.grad, xd.grad, "grad_x")
    assert_within_rule(v.grad.cpu(), v64.grad, vd.grad, "grad_values")


def test_empty_tokens():
    b = _b(10, 6)
    h = ops.shrink(torch.zeros(0, 11), rank=6, seed=SEED, col_start=2, in_features=20)
    assert h.shape == (0, 6) and h.dtype == torch.float32
    assert ops.expand(h, b).shape == (0, 10)
    gx = ops.shrink_backward(h, 11, torch.float32, 6, SEED, "rademacher", 2, 20)
    assert gx.shape == (0, 11)
    gh, gv = ops.expand_backward(torch.zeros(0, 10), h, b.mask, b.values, b.offsets, 1.0, True,
                                 True)
    assert gh.shape == (0, 6) and torch.equal(gv, torch.zeros_like(b.values))


@pytest.mark.parametrize("prefix", ["", "triton_"])
def test_opcheck_shrink_expand(prefix):
    if prefix and BACKENDS[1].marks:
        pytest.skip(BACKENDS[1].marks[0].kwargs["reason"])
    rank, out = 6, 10
    b = _b(out, rank)
    x = torch.randn(2, 3, 11, generator=_gen(1), requires_grad=True)
    h = torch.randn(2, 3, rank, generator=_gen(2), requires_grad=True)
    gy = torch.randn(2, 3, out, generator=_gen(3))
    op = lambda name: getattr(lori, prefix + name)  # noqa: E731
    torch.library.opcheck(op("shrink"), (x, rank, SEED, "uniform", 21, 50))
    torch.library.opcheck(op("shrink_backward"),
                          (h.detach(), 11, torch.float32, rank, SEED, "rademacher", 21, 50))
    torch.library.opcheck(op("expand"), (h, b.mask, b.values.clone().requires_grad_(),
                                         b.offsets, 0.5))
    torch.library.opcheck(op("expand_backward"),
                          (gy, h.detach(), b.mask, b.values, b.offsets, 0.5, True, True))


BAD = [
    (lambda a: a.update(col_start=-3), ValueError, "col_start must be >= 0"),
    (lambda a: a.update(col_start=45), ValueError, "exceeds in_features"),
    (lambda a: a.update(in_features=-5), ValueError, "in_features must be >= 1"),
    (lambda a: a.update(rank=0), ValueError, "rank must be in"),
    (lambda a: a.update(distribution="normal"), ValueError, "distribution"),
    (lambda a: a.update(x=torch.zeros(3, 11, dtype=torch.int32)), TypeError, "x must be float"),
]


@pytest.mark.parametrize("mutate,exc,msg", BAD)
@pytest.mark.parametrize("where", ["cpp", "triton", "meta"])
def test_bad_shrink_arguments(mutate, exc, msg, where):
    if where == "triton" and BACKENDS[1].marks:
        pytest.skip(BACKENDS[1].marks[0].kwargs["reason"])
    a = dict(x=torch.randn(3, 11), rank=6, seed=SEED, distribution="uniform", col_start=21,
             in_features=50)
    mutate(a)
    if where == "meta":
        a["x"] = a["x"].to("meta")
    f = lori.triton_shrink if where == "triton" else lori.shrink
    with pytest.raises(exc, match=msg):
        f(a["x"], a["rank"], a["seed"], a["distribution"], a["col_start"], a["in_features"])


@pytest.mark.parametrize("where", ["cpp", "triton", "meta"])
def test_bad_expand_arguments(where):
    if where == "triton" and BACKENDS[1].marks:
        pytest.skip(BACKENDS[1].marks[0].kwargs["reason"])
    f = lori.triton_expand if where == "triton" else lori.expand
    b = _b(10, 6)
    dev = "meta" if where == "meta" else "cpu"
    m, v, o = (t.to(dev) for t in (b.mask, b.values, b.offsets))
    with pytest.raises(TypeError, match="h must be torch.float32|h must be float32"):
        f(torch.zeros(3, 6, dtype=torch.bfloat16, device=dev), m, v, o, 1.0)
    with pytest.raises(TypeError, match="h must be"):
        f(torch.zeros(3, 6, dtype=torch.float64, device=dev), m, v, o, 1.0)
    with pytest.raises(ValueError, match="mask must have shape"):
        f(torch.zeros(3, 40, device=dev), m, v, o, 1.0)  # rank 40 from h: 2 mask words
    with pytest.raises(ValueError, match="scale must be finite"):
        f(torch.zeros(3, 6, device=dev), m, v, o, float("inf"))
    gb = lori.triton_expand_backward if where == "triton" else lori.expand_backward
    with pytest.raises(ValueError, match="grad_y must have shape"):
        gb(torch.zeros(3, 11, device=dev), torch.zeros(3, 6, device=dev), m, v, o, 1.0, True,
           True)


def test_router_never_falls_back_silently():
    """backend='triton' runs the Triton twin (or raises naming it), never the C++ op."""
    x = torch.randn(2, 11)
    try:
        from lori_kernels import triton as lt
        ok = lt.available() and lt.interpreted()
    except Exception:
        ok = False
    if ok:
        h = ops.shrink(x, rank=4, seed=1, backend="triton")
        torch.testing.assert_close(h, ops.shrink(x, rank=4, seed=1, backend="cpp"),
                                   rtol=1e-5, atol=1e-6)
    else:
        with pytest.raises(RuntimeError, match="triton"):
            ops.shrink(x, rank=4, seed=1, backend="triton")

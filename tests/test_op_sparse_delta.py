"""sparse_delta, sparse_delta_fwd and sparse_delta_backward (with autograd) against the
pure-PyTorch reference, on every backend: the C++ kernels on the CPU, Triton (under the
interpreter without a GPU) and the C++ CUDA kernels (skipped without a GPU).

Each test takes a `backend` (tests/op_backends.py); where the backends need different sizes
(the Triton interpreter costs milliseconds per program) each keeps its own case rows. The
Triton-only configuration tests (forced tiles, split reductions, the Philox kernel) are in
tests/test_backend_triton.py, the CUDA host-side checks in tests/test_backend_cuda.py.
"""
import os
import subprocess
import sys

import pytest
import torch

import lori_kernels as L
from lori_kernels import reference, spec
from lori_kernels.testing import (
    assert_within_rule, bad_delta_arguments, baseline_grads, check_compile_fullgraph,
    dense_lora_baseline, random_packed, reference_grads)

from cuda_cases import (DTYPES, SEED, SHAPES, _ref_a, _seed_arg, make_b, ops, run_delta,
                        tol_ok)
from op_backends import backends, cases, check_backward, check_forward, pytest_id

DISTS = ["rademacher", "uniform"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- forward -------------------------------------------------------------------------------------
# Rows: (T, in, out, rank, density); None: random_packed's default density.

@pytest.mark.parametrize("dtype", DTYPES, ids=pytest_id)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("backend,T,dims", cases({
    "cpu": [(T, (341, 129, 32, None)) for T in [0, 1, 7, 16, 17, 513]],
    "triton": [(T, (131, 70, 33, 0.3)) for T in [0, 1, 7, 33]],
}), ids=pytest_id)
def test_forward_tokens(backend, T, dims, dist, dtype):
    inp, out, rank, density = dims
    g = _gen(T)
    x = torch.randn(T, inp, generator=g).to(dtype)
    kw = {} if density is None else dict(density=density)
    b = random_packed(out, rank, generator=g, dtype=dtype, **kw)
    check_forward(backend, x, b, 1234, dist, 2.0, f"T={T} {dtype} {dist}")


@pytest.mark.parametrize("backend,rank,in_out,tokens,density", cases({
    "cpu": [(rank, io, (1, 9, 40), 0.2) for io in [(1, 1), (7, 9), (129, 65), (341, 77)]
            for rank in [1, 2, 31, 32, 33, 64, 100, 128]],
    "triton": [(rank, (77, 65), (9,), 0.3) for rank in [1, 32, 70]],
}), ids=pytest_id)
def test_forward_shapes_and_ranks(backend, rank, in_out, tokens, density):
    inp, out = in_out
    g = _gen(rank * 7 + inp)
    for T in tokens:
        x = torch.randn(T, inp, generator=g)
        b = random_packed(out, rank, density=density, generator=g)
        check_forward(backend, x, b, rank + inp, "rademacher", 0.5,
                       f"rank={rank} in/out={in_out} T={T}")


@pytest.mark.parametrize("mask", ["zeros", "ones"])
@pytest.mark.parametrize("backend,T", cases({"cpu": [1, 33], "triton": [7]}), ids=pytest_id)
def test_forward_all_zero_and_all_one_masks(backend, T, mask):
    g = _gen(5)
    x = torch.randn(T, 200, generator=g)
    b = random_packed(70, 40, generator=g, mask=mask)
    y = check_forward(backend, x, b, 9, "uniform", 1.0)
    if mask == "zeros":
        assert torch.count_nonzero(y) == 0


@pytest.mark.parametrize("backend,T,inp", cases({"cpu": [(5, 300), (40, 300)],
                                                 "triton": [(5, 150)]}), ids=pytest_id)
def test_forward_noncontiguous_and_3d(backend, T, inp):
    g = _gen(T)
    big = torch.randn(2, T, 2 * inp, generator=g).to(backend.device)
    x = big[..., ::2]                       # non-contiguous, 3-D
    assert not x.is_contiguous()
    b = random_packed(90, 24, generator=g)
    y = check_forward(backend, x, b, 3, "rademacher", 1.5)
    y2 = check_forward(backend, x.contiguous().reshape(-1, inp), b, 3, "rademacher", 1.5)
    assert torch.equal(y.reshape(-1, 90), y2)
    xt = torch.randn(inp, T, generator=g).to(backend.device).t()   # transposed view
    check_forward(backend, xt, b, 3, "uniform", 1.0)
    y1 = check_forward(backend, torch.randn(inp, generator=g), b, 3, "uniform", 1.0)  # 1-D x
    assert y1.shape == (90,)


@pytest.mark.parametrize("backend,T,inp,out,rank,dtype", cases({
    "cpu": [(300, 512, 256, 32, torch.float32)],
    "cuda": [(256, 4096, 4096, 32, torch.bfloat16)],
}), ids=pytest_id)
def test_deterministic(backend, T, inp, out, rank, dtype):
    g = _gen(1)
    x = backend.to(torch.randn(T, inp, generator=g).to(dtype))
    b = backend.to(random_packed(out, rank, generator=g, dtype=dtype))
    assert torch.equal(backend.sparse_delta(x, b, 1, "rademacher", 1.0),
                       backend.sparse_delta(x, b, 1, "rademacher", 1.0))


@pytest.mark.parametrize("backend,T,inp,out,rank,seed,dist,scale", cases({
    "cpu": [(30, 50, 20, 9, 3, "rademacher", 2.0)],
    "triton": [(6, 50, 20, 9, 3, "rademacher", 0.3)],
    "cuda": [(9, 70, 65, 33, SEED, "uniform", 0.7)],
}), ids=pytest_id)
def test_float64_forward_is_reference_exact(backend, T, inp, out, rank, seed, dist, scale):
    g = _gen(0)
    x = torch.randn(T, inp, generator=g, dtype=torch.float64)
    b = random_packed(out, rank, generator=g, dtype=torch.float64)
    y = L.sparse_delta(backend.to(x), backend.to(b), seed=seed, distribution=dist, scale=scale,
                       backend=backend.route)
    ref = reference.sparse_delta(x, b.to_dense(), seed, dist, scale)
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-12, atol=1e-12)


# ---- backward ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=pytest_id)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("backend,T,dims", cases({
    "cpu": [(T, (333, 131, 33, None)) for T in [1, 7, 16, 17, 130]],
    "triton": [(T, (133, 70, 33, 0.3)) for T in [1, 33]],
}), ids=pytest_id)
def test_backward_against_reference(backend, T, dims, dist, dtype):
    inp, out, rank, density = dims
    g = _gen(T + 100)
    x = torch.randn(T, inp, generator=g).to(dtype)
    kw = {} if density is None else dict(density=density)
    b = random_packed(out, rank, generator=g, dtype=dtype, **kw)
    check_backward(backend, x, b, 77, dist, 2.0, f"T={T} {dtype} {dist}")


@pytest.mark.parametrize("need", [(True, False), (False, True)])
@pytest.mark.parametrize("backend", backends("cpu", "triton"))
def test_backward_needs_input_grad(backend, need):
    g = _gen(3)
    x = backend.to(torch.randn(9, 64, generator=g)).requires_grad_(need[0])
    b = backend.to(random_packed(40, 8, generator=g))
    values = b.values.clone().requires_grad_(need[1])
    L.sparse_delta(x, b.with_values(values), seed=1, backend=backend.route).sum().backward()
    assert (x.grad is not None) == need[0]
    assert (values.grad is not None) == need[1]
    gx, gv = backend.sparse_delta_backward(
        torch.ones(9, 40, device=backend.device), x.detach(), b.mask, b.values, b.offsets, 8, 1,
        "rademacher", 1.0, need[0], need[1])
    assert (gx.numel() > 0) == need[0] and (gv.numel() > 0) == need[1]


@pytest.mark.parametrize("backend,dist", cases({"cpu": ["rademacher"], "triton": ["uniform"]}),
                         ids=pytest_id)
def test_backward_empty_batch(backend, dist):
    b = backend.to(random_packed(40, 8, generator=_gen(0)))
    x = torch.randn(0, 64, device=backend.device, requires_grad=True)
    values = b.values.clone().requires_grad_()
    backend.sparse_delta(x, b, 1, dist, 1.0, values=values).sum().backward()
    assert x.grad.shape == (0, 64)
    assert torch.count_nonzero(values.grad) == 0


@pytest.mark.parametrize("backend,T,inp,out,rank,density,dist", cases({
    "cpu": [(T, i, o, r, 0.4, d) for T, i, o, r in [(3, 13, 11, 5), (20, 37, 70, 33)]
            for d in DISTS],
    "triton": [(2, 9, 6, 3, 0.5, "uniform")],
    "cuda": [(3, 70, 65, 33, 0.1, "uniform")],
}), ids=pytest_id)
def test_gradcheck_float64(backend, T, inp, out, rank, density, dist):
    g = _gen(0)
    x = backend.to(torch.randn(T, inp, generator=g, dtype=torch.float64)).requires_grad_()
    b = backend.to(random_packed(out, rank, density=density, generator=g, dtype=torch.float64))
    v = b.values.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, v: backend.sparse_delta(x, b, 5, dist, 1.5, values=v), (x, v))


# ---- op machinery --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype,tokens", cases({
    "cpu": [(dt, (1, 20)) for dt in [torch.float32, torch.bfloat16, torch.float64]],
    "triton": [(dt, (3,)) for dt in [torch.float32, torch.bfloat16]],
}), ids=pytest_id)
def test_opcheck(backend, dtype, tokens):
    g = _gen(1)
    b = backend.to(random_packed(70, 33, generator=g, dtype=dtype))
    fwd, bwd = backend.op("sparse_delta").default, backend.op("sparse_delta_backward").default
    for T in tokens:
        x = backend.to(torch.randn(T, 45, generator=g).to(dtype))
        args = (x, b.mask, b.values, b.offsets, b.rank, 7, "uniform", 1.5)
        torch.library.opcheck(fwd, args)
        gy = backend.to(torch.randn(T, 70, generator=g).to(dtype))
        torch.library.opcheck(bwd, (gy, *args, True, True))
    xg = backend.to(torch.randn(4, 45, generator=g).to(dtype)).requires_grad_()
    vg = b.values.clone().requires_grad_()
    torch.library.opcheck(fwd, (xg, b.mask, vg, b.offsets, b.rank, 7, "rademacher", 1.0))


@pytest.mark.parametrize("backend", backends("cpu", "triton"))
def test_torch_compile_fullgraph(backend):
    g = _gen(2)
    b = backend.to(random_packed(64, 16, generator=g))
    op = backend.op("sparse_delta")

    def f(x, v):
        y = op(x, b.mask, v, b.offsets, 16, 11, "rademacher", 2.0)
        return torch.nn.functional.gelu(y).sum()

    check_compile_fullgraph(f, backend.to(torch.randn(5, 48, generator=g)), b.values.clone())


# ---- bad input -----------------------------------------------------------------------------------

def _args(backend, T=3, inp=40, out=20, rank=8, dtype=torch.float32):
    g = _gen(9)
    b = backend.to(random_packed(out, rank, generator=g, dtype=dtype))
    return [backend.to(torch.randn(T, inp, generator=g).to(dtype)), b.mask, b.values, b.offsets,
            rank, 1, "rademacher", 1.0]


@pytest.mark.parametrize("backend", backends("cpu", "triton"))
@pytest.mark.parametrize("i", range(len(bad_delta_arguments())),
                         ids=[c[2] for c in bad_delta_arguments()])
def test_bad_arguments_raise_clear_errors(i, backend):
    mutate, exc, msg = bad_delta_arguments(backend.device)[i]
    a = _args(backend)
    mutate(a)
    with pytest.raises(exc, match=msg):
        backend.op("sparse_delta")(*a)
    gy = torch.ones(3, 20, dtype=a[0].dtype if a[0].is_floating_point() else torch.float32,
                    device=backend.device)
    with pytest.raises(exc, match=msg):
        backend.sparse_delta_backward(gy, *a, True, True)


@pytest.mark.parametrize("backend", backends("cpu", "triton"))
def test_grad_y_checked(backend):
    a = _args(backend)
    with pytest.raises(ValueError, match="grad_y must have shape"):
        backend.sparse_delta_backward(torch.ones(3, 21, device=backend.device), *a, True, True)
    with pytest.raises(TypeError, match="grad_y dtype"):
        backend.sparse_delta_backward(torch.ones(3, 20, dtype=torch.float64,
                                                 device=backend.device), *a, True, True)


# ---- the C++ CPU kernels' own paths (GEMM column tiles, the decode backward, host checks) ---------

@pytest.mark.parametrize("backend", backends("cpu"))
def test_forward_many_seeds(backend):
    g = _gen(0)
    x = torch.randn(3, 100, generator=g)
    b = random_packed(50, 16, density=0.5, generator=g)
    outs = []
    for seed in [0, 1, 2**32, 2**63, 2**64 - 1, 123456789]:
        outs.append(check_forward(backend, x, b, seed, "rademacher", 1.0))
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("rank, inp, T, dtype", [(32, 4096 + 300, 20, torch.float32),
                                                 (128, 2500, 20, torch.float32),
                                                 (32, 3600, 600, torch.bfloat16)])
@pytest.mark.parametrize("backend", backends("cpu"))
def test_several_a_tiles(backend, rank, inp, T, dtype):
    # The GEMM paths (T > 16) generate A in column tiles of 1024-4096 columns by rank
    # (delta_common.h gemm_tile; narrower for bf16 x at large T, delta_common.cpp): cross
    # tile edges, with a last tile not a multiple of 128.
    g = _gen(rank + inp)
    x = torch.randn(T, inp, generator=g).to(dtype).requires_grad_()
    b = random_packed(70, rank, density=0.2, generator=g, dtype=dtype)
    values = b.values.clone().requires_grad_()
    check_forward(backend, x.detach(), b, 11, "uniform", 1.5, f"rank={rank} in={inp}")
    y = L.sparse_delta(x, b.with_values(values), seed=11, distribution="uniform", scale=1.5)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    rgx, rgv = reference_grads(x.detach(), b, 11, "uniform", 1.5, gy)
    bgx, bgv = baseline_grads(x.detach(), b, 11, "uniform", 1.5, gy)
    assert_within_rule(x.grad, rgx, bgx, "grad_x")
    assert_within_rule(values.grad, rgv, bgv, "grad_values")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("rank", [1, 17, 32])
@pytest.mark.parametrize("backend", backends("cpu"))
def test_backward_decode(backend, dtype, dist, T, rank):
    # T <= 4 with rank <= 32 takes the decode backward on AVX-512 CPUs (one walk over B's rows;
    # Rademacher grad_x from A's sign bits): out not a multiple of 64, in not of 16 or 128, with
    # the forward's saved h (autograd) and without it (the op alone), each need flag alone.
    g = _gen(T * 100 + rank)
    x = torch.randn(T, 333, generator=g).to(dtype).requires_grad_()
    b = random_packed(131, rank, density=0.3, generator=g, dtype=dtype)
    values = b.values.clone().requires_grad_()
    y = L.sparse_delta(x, b.with_values(values), seed=77, distribution=dist, scale=2.0)
    gy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(gy)
    rgx, rgv = reference_grads(x.detach(), b, 77, dist, 2.0, gy)
    bgx, bgv = baseline_grads(x.detach(), b, 77, dist, 2.0, gy)
    assert_within_rule(x.grad, rgx, bgx, "grad_x")
    assert_within_rule(values.grad, rgv, bgv, "grad_values")
    for need_x, need_v in ((True, True), (True, False), (False, True)):
        gx, gv = torch.ops.lori.sparse_delta_backward(
            gy, x.detach(), b.mask, b.values, b.offsets, rank, 77, dist, 2.0, need_x, need_v)
        assert (gx.numel() > 0) == need_x and (gv.numel() > 0) == need_v
        if need_x:
            assert_within_rule(gx, rgx, bgx, "grad_x (op, h recomputed)")
        if need_v:
            assert_within_rule(gv, rgv, bgv, "grad_values (op, h recomputed)")


@pytest.mark.parametrize("backend", backends("cpu"))
def test_backward_decode_corrupt_mask(backend):
    b = random_packed(130, 32, generator=_gen(2))
    bad = b.mask.clone()
    bad[70, 0] ^= 1 << 5   # chunk 1 now disagrees with offsets
    with pytest.raises(ValueError, match="offsets"):
        torch.ops.lori.sparse_delta_backward(torch.randn(1, 130), torch.randn(1, 64), bad,
                                             b.values, b.offsets, 32, 1, "rademacher", 1.0,
                                             True, True)


@pytest.mark.parametrize("backend", backends("cpu"))
def test_torch_compile_inductor(backend):
    g = _gen(3)
    b = random_packed(32, 8, generator=g)
    f = torch.compile(lambda x: L.sparse_delta(x, b, seed=4) * 2, fullgraph=True)
    x = torch.randn(3, 40, generator=g)
    torch.testing.assert_close(f(x), L.sparse_delta(x, b, seed=4) * 2)


@pytest.mark.parametrize("backend", backends("cpu"))
def test_corrupt_bitmask_is_caught_not_read_out_of_bounds(backend):
    a = _args(backend, out=130, rank=40)
    mask, values, offsets = a[1], a[2], a[3]
    bad = mask.clone(); bad[0, 0] ^= 1 << 5
    for m, v, o, msg in [
        (bad, values, offsets, "offsets"),
        (mask, values[:-2], offsets, "values has"),
        (mask, torch.cat([values, values[:3]]), offsets, "values has"),
        (mask.clone().index_put_((torch.tensor([3]), torch.tensor([1])), torch.tensor(1 << 20, dtype=torch.int32)), values, offsets, "rank"),
        (mask, values, offsets - 1, "offsets\\[0\\] must be 0"),
    ]:
        for op_args in ([a[0], m, v, o, *a[4:]],):
            with pytest.raises(ValueError, match=msg):
                backend.op("sparse_delta")(*op_args)
            with pytest.raises(ValueError, match=msg):
                torch.ops.lori.sparse_delta_backward(torch.ones(3, 130), *op_args, True, True)


@pytest.mark.parametrize("backend", backends("cpu"))
def test_device_mismatch_is_named(backend):
    a = _args(backend)
    a[1] = a[1].to("meta")
    with pytest.raises((RuntimeError, NotImplementedError), match="mask|meta"):
        backend.op("sparse_delta")(*a)


@pytest.mark.parametrize("backend", backends("cpu"))
def test_python_wrapper_errors(backend):
    b = random_packed(10, 4, generator=_gen(0))
    with pytest.raises(TypeError, match="PackedB"):
        L.sparse_delta(torch.randn(2, 5), b.to_dense(), seed=1)
    with pytest.raises(ValueError, match="seed"):
        L.sparse_delta(torch.randn(2, 5), b, seed=-3)


@pytest.mark.parametrize("backend", backends("cpu"))
def test_backend_selection(backend, monkeypatch):
    from lori_kernels import backends
    g = _gen(6)
    x = torch.randn(5, 70, generator=g)
    b = random_packed(30, 8, generator=g)
    assert backends.resolve(None, x.device) == "cpp"
    assert backends.resolve("auto", x.device) == "cpp"
    with pytest.raises(ValueError, match="backend must be one of"):
        L.sparse_delta(x, b, seed=1, backend="cuda")
    with pytest.raises(ValueError, match="set_backend"):
        L.set_backend("bogus")
    bad_env = subprocess.run([sys.executable, "-c", "import lori_kernels"], capture_output=True,
                             text=True, env={**os.environ, "LORI_BACKEND": "bogus"})
    assert bad_env.returncode != 0 and "LORI_BACKEND" in bad_env.stderr
    import lori_kernels.triton as lt
    if not (lt.available() and lt.interpreted()):
        pytest.skip("Triton interpreter not active")
    L.set_backend("triton")
    y_t = L.sparse_delta(x, b, seed=1)
    a_t = L.random_a(3, 8, 70)
    L.set_backend("cpp")
    torch.testing.assert_close(y_t, L.sparse_delta(x, b, seed=1), rtol=1e-5, atol=1e-5)
    assert torch.equal(a_t, L.random_a(3, 8, 70))
    assert torch.equal(L.random_a(3, 8, 70, backend="triton"), a_t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("T", [0, 3, 40])
@pytest.mark.parametrize("backend", backends("cpu"))
def test_sparse_delta_fwd_returns_h_and_backward_reuses_it(backend, dtype, T):
    g = _gen(T + 7)
    b = random_packed(70, 33, generator=g, dtype=dtype)
    x = torch.randn(T, 45, generator=g).to(dtype)
    args = (x, b.mask, b.values, b.offsets, b.rank, 7, "uniform", 1.5)
    y, h = torch.ops.lori.sparse_delta_fwd(*args)
    assert torch.equal(y, torch.ops.lori.sparse_delta(*args))
    hdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert h.shape == (T, 33) and h.dtype == hdt
    href = x.double() @ reference.random_a(7, 33, 45, "uniform").double().T
    torch.testing.assert_close(h.double(), href, rtol=1e-5, atol=1e-5)
    gy = torch.randn(T, 70, generator=g).to(dtype)
    with_h = torch.ops.lori.sparse_delta_backward(gy, *args, True, True, h)
    without = torch.ops.lori.sparse_delta_backward(gy, *args, True, True)
    torch.testing.assert_close(with_h[0], without[0])
    torch.testing.assert_close(with_h[1], without[1], rtol=1e-4, atol=1e-4)
    torch.library.opcheck(torch.ops.lori.sparse_delta_fwd.default, args)
    torch.library.opcheck(torch.ops.lori.sparse_delta_backward.default, (gy, *args, True, True, h))
    if T:
        with pytest.raises(ValueError, match="h must be"):
            torch.ops.lori.sparse_delta_backward(gy, *args, True, True, h[:, :5].contiguous())



# ---- Triton against the C++ op; the Triton interpreter's host-side content checks ---------------

@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("backend", backends("triton"))
def test_forward_close_to_cpp(backend, dist):
    g = _gen(8)
    x = torch.randn(10, 160, generator=g)
    b = random_packed(100, 48, density=0.3, generator=g)
    y = backend.sparse_delta(backend.to(x), backend.to(b), 2**63 + 5, dist, 1.25).cpu()
    c = ops.sparse_delta(x, b.mask, b.values, b.offsets, 48, spec.check_seed(2**63 + 5), dist,
                          1.25)
    torch.testing.assert_close(y, c, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="contents are validated on the host for CPU tensors")
@pytest.mark.parametrize("backend", backends("triton"))
def test_inconsistent_bitmask_is_caught(backend):
    a = _args(backend, out=130, rank=40)
    mask, values, offsets = a[1], a[2], a[3]
    bad = mask.clone()
    bad[0, 0] ^= 1 << 5
    high = mask.clone()
    high[3, 1] = 1 << 20  # bit 52 >= rank 40
    for m, v, o, msg in [(bad, values, offsets, "offsets|entries"),
                         (mask, torch.cat([values, values[:3]]), offsets, "values has"),
                         (high, values, offsets, "rank"),
                         (mask, values, offsets - 1, "offsets")]:
        with pytest.raises(ValueError, match=msg):
            backend.op("sparse_delta")(a[0], m, v, o, *a[4:])


@pytest.mark.slow
@pytest.mark.parametrize("T,dtype,dist", [(130, torch.float32, "rademacher"),
                                          (130, torch.bfloat16, "uniform"),
                                          (17, torch.float16, "uniform"),
                                          (17, torch.bfloat16, "rademacher")])
@pytest.mark.parametrize("backend", backends("triton"))
def test_sweep_larger_shapes(backend, T, dtype, dist):
    g = _gen(T)
    x = torch.randn(T, 520, generator=g).to(dtype)
    b = random_packed(200, 128, density=0.1, generator=g, dtype=dtype)
    check_forward(backend, x, b, 2**64 - 1, dist, 2.0, f"T={T}")
    check_backward(backend, x, b, 2**64 - 1, dist, 2.0, f"T={T}")



# ---- CUDA: the benchmark-sized sweeps, judged against plain torch on the GPU ---------------------
# (cuda_cases.tol_ok: err <= 2 * err(plain torch in the same dtype) + 4 eps max|ref|)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 7, 513, 4096])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("distribution", ["rademacher", "uniform"])
@pytest.mark.parametrize("backend", backends("cuda"))
def test_sparse_delta_forward(backend, dtype, T, shape, distribution):
    in_f, out_f, rank = shape
    packed, b = make_b(out_f, rank, "sparse", dtype, "cuda", gen_seed=T + rank)
    x = torch.randn(T, in_f, device="cuda", dtype=torch.float64).to(dtype)
    scale = 0.75
    y = run_delta(x, packed, SEED, distribution, scale)
    assert y.shape == (T, out_f) and y.dtype == dtype
    if T == 0:
        return
    a = _ref_a(SEED, rank, in_f, distribution).cuda()
    ref = (x.double() @ a.double().T) @ b.double().T * scale
    plain = reference.dense_lora(x, a.to(dtype), b, scale)
    ok, msg = tol_ok(y, ref, plain)
    assert ok, msg


@pytest.mark.parametrize("kind", ["zero", "full"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 513])
@pytest.mark.parametrize("backend", backends("cuda"))
def test_sparse_delta_extreme_masks(backend, kind, dtype, T):
    in_f, out_f, rank = 300, 130, 40
    packed, b = make_b(out_f, rank, kind, dtype, "cuda")
    x = torch.randn(T, in_f, device="cuda").to(dtype)
    y = run_delta(x, packed, SEED, "rademacher", 2.0)
    if kind == "zero":
        assert torch.equal(y, torch.zeros_like(y))
        return
    a = _ref_a(SEED, rank, in_f, "rademacher").cuda()
    ref = (x.double() @ a.double().T) @ b.double().T * 2.0
    ok, msg = tol_ok(y, ref, reference.dense_lora(x, a.to(dtype), b, 2.0))
    assert ok, msg


@pytest.mark.parametrize("backend", backends("cuda"))
def test_sparse_delta_non_contiguous_and_batched(backend):
    packed, b = make_b(96, 32, "sparse", torch.float32, "cuda")
    big = torch.randn(3, 5, 2 * 200, device="cuda")
    x = big[..., ::2]  # (3, 5, 200), non-contiguous
    y = run_delta(x, packed, 5, "uniform", 1.0)
    y2 = run_delta(x.contiguous(), packed, 5, "uniform", 1.0)
    assert y.shape == (3, 5, 96)
    assert torch.equal(y, y2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", backends("cuda"))
def test_cuda_matches_cpu(backend, dtype):
    packed, _ = make_b(200, 32, "sparse", dtype, "cpu")
    x = torch.randn(37, 257).to(dtype)
    y_cpu = run_delta(x, packed, SEED, "rademacher", 0.5)
    y_gpu = run_delta(x.cuda(), packed.to("cuda"), SEED, "rademacher", 0.5).cpu()
    ref = y_cpu.double()
    err = (y_gpu.double() - ref).abs().max().item()
    assert err <= 8 * torch.finfo(dtype).eps * ref.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 513, 4096])
@pytest.mark.parametrize("shape", [(4096, 4096, 32), (341, 129, 7), (200, 72, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", backends("cuda"))
def test_sparse_delta_backward(backend, dtype, T, shape):
    in_f, out_f, rank = shape
    dist = "uniform" if T == 7 else "rademacher"
    packed, b = make_b(out_f, rank, "sparse", dtype, "cuda", gen_seed=T)
    x = torch.randn(T, in_f, device="cuda").to(dtype)
    gy = torch.randn(T, out_f, device="cuda").to(dtype)
    scale = 1.5
    gx, gv = ops.sparse_delta_backward(gy, x, packed.mask, packed.values, packed.offsets, rank,
                                       _seed_arg(SEED), dist, scale, True, True)
    a = _ref_a(SEED, rank, in_f, dist).cuda()
    m = packed.bool_mask()
    gx_ref = (gy.double() @ b.double()) @ a.double() * scale
    gb_ref = gy.double().T @ (x.double() @ a.double().T) * scale
    # Plain torch in the same dtype: autograd through dense_lora.
    xt = x.clone().requires_grad_(True)
    bt = b.clone().requires_grad_(True)
    reference.dense_lora(xt, a.to(dtype), bt, scale).backward(gy)
    ok, msg = tol_ok(gx, gx_ref, xt.grad)
    assert ok, "grad_x: " + msg
    ok, msg = tol_ok(gv, gb_ref[m], bt.grad[m])
    assert ok, "grad_values: " + msg
    # need_* flags: empty results when not needed.
    gx2, gv2 = ops.sparse_delta_backward(gy, x, packed.mask, packed.values, packed.offsets, rank,
                                         _seed_arg(SEED), dist, scale, False, True)
    assert gx2.numel() == 0 and torch.equal(gv2, gv)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("T", [0, 1, 7, 513])
@pytest.mark.parametrize("in_f", [341, 512])
@pytest.mark.parametrize("dist", ["uniform", "rademacher"])
@pytest.mark.parametrize("backend", backends("cuda"))
def test_sparse_delta_fwd_h_within_rule_and_reused(backend, dist, in_f, dtype, T):
    """sparse_delta_fwd: y as sparse_delta (within the rule), h = x @ A^T in fp32 (fp64 for
    float64) from A's fp32 values; the backward given h matches the one that recomputes it.
    in_features 512 (a multiple of 8) lets bf16/fp16 prefill take the tensor-core shrink, which
    must keep h exact to fp32 accumulation (Rademacher; uniform A takes the SIMT kernel)."""
    out_f, rank = 200, 40
    packed, b = make_b(out_f, rank, "sparse", dtype, "cuda", gen_seed=T + 1)
    x = torch.randn(T, in_f, device="cuda").to(dtype)
    args = (x, packed.mask, packed.values, packed.offsets, rank, _seed_arg(SEED), dist, 0.5)
    y, h = ops.sparse_delta_fwd(*args)
    hdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.shape == (T, out_f) and y.dtype == dtype
    assert h.shape == (T, rank) and h.dtype == hdt and h.is_cuda
    if T == 0:
        return
    a = _ref_a(SEED, rank, in_f, dist).cuda()
    ok, msg = tol_ok(y, (x.double() @ a.double().T) @ b.double().T * 0.5,
                     reference.dense_lora(x, a.to(dtype), b, 0.5))
    assert ok, msg
    h_ref = x.double() @ a.double().T
    err = (h.double() - h_ref).abs().max().item()
    assert err <= 1e-4 * max(h_ref.abs().max().item(), 1.0), err  # fp32 accumulation of exact products
    gy = torch.randn(T, out_f, device="cuda").to(dtype)
    bargs = (gy, *args, True, True)
    gx0, gv0 = ops.sparse_delta_backward(*bargs)
    gx1, gv1 = ops.sparse_delta_backward(*bargs, h)
    assert torch.equal(gx0, gx1)
    torch.testing.assert_close(gv1, gv0)
    with pytest.raises(ValueError, match="h must be"):
        ops.sparse_delta_backward(*bargs, h[:, :-1])
    torch.library.opcheck(ops.sparse_delta_fwd.default, args)


@pytest.mark.parametrize("backend", backends("cuda"))
def test_backward_empty_batch_and_zero_mask(backend):
    packed, _ = make_b(70, 33, "zero", torch.float32, "cuda")
    x = torch.randn(0, 100, device="cuda")
    gy = torch.randn(0, 70, device="cuda")
    gx, gv = ops.sparse_delta_backward(gy, x, packed.mask, packed.values, packed.offsets, 33,
                                       1, "rademacher", 1.0, True, True)
    assert gx.shape == (0, 100) and gv.shape == (0,)
    x = torch.randn(5, 100, device="cuda")
    gx, _ = ops.sparse_delta_backward(torch.randn(5, 70, device="cuda"), x, packed.mask,
                                      packed.values, packed.offsets, 33, 1, "rademacher", 1.0,
                                      True, True)
    assert torch.equal(gx, torch.zeros_like(gx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", backends("cuda"))
def test_opcheck_cuda(backend, dtype):
    packed, _ = make_b(130, 40, "sparse", dtype, "cuda")
    x = torch.randn(9, 100, device="cuda").to(dtype).requires_grad_(True)
    values = packed.values.clone().requires_grad_(True)
    args = (x, packed.mask, values, packed.offsets, 40, _seed_arg(SEED), "rademacher", 0.5)
    torch.library.opcheck(ops.sparse_delta.default, args)
    gy = torch.randn(9, 130, device="cuda").to(dtype)
    torch.library.opcheck(ops.sparse_delta_backward.default,
                          (gy, x.detach(), packed.mask, packed.values, packed.offsets, 40,
                           _seed_arg(SEED), "rademacher", 0.5, True, True))
    counters = torch.randint(0, 1000, (17, 4), device="cuda", dtype=torch.int32)
    torch.library.opcheck(ops.philox4x32_10.default, (counters, _seed_arg(SEED)))


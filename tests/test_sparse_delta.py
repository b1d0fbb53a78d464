"""sparse_delta and its backward on CPU against the pure-PyTorch reference."""
import os
import subprocess
import sys

import pytest
import torch

import lori_kernels as L
from lori_kernels import reference, spec
from lori_kernels.testing import (
    assert_within_rule, bad_delta_arguments, baseline_grads, dense_lora_baseline, random_packed,
    reference_grads)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DISTS = ["rademacher", "uniform"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _check_forward(x, b, seed, dist, scale, what=""):
    y = L.sparse_delta(x, b, seed=seed, distribution=dist, scale=scale)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], b.out_features)
    ref = reference.sparse_delta(x, b.to_dense(), seed, dist, scale)
    assert_within_rule(y, ref, dense_lora_baseline(x, b, seed, dist, scale), what)
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("T", [0, 1, 7, 16, 17, 513])
def test_forward_tokens(dtype, dist, T):
    g = _gen(T)
    x = torch.randn(T, 341, generator=g).to(dtype)
    b = random_packed(129, 32, generator=g, dtype=dtype)
    _check_forward(x, b, 1234, dist, 2.0, f"T={T}")


@pytest.mark.parametrize("rank", [1, 2, 31, 32, 33, 64, 100, 128])
@pytest.mark.parametrize("in_out", [(1, 1), (7, 9), (129, 65), (341, 77)])
def test_forward_shapes_and_ranks(rank, in_out):
    inp, out = in_out
    g = _gen(rank * 7 + inp)
    for T in (1, 9, 40):
        x = torch.randn(T, inp, generator=g)
        b = random_packed(out, rank, density=0.2, generator=g)
        _check_forward(x, b, rank + inp, "rademacher", 0.5, f"rank={rank} in/out={in_out} T={T}")


@pytest.mark.parametrize("mask", ["zeros", "ones"])
@pytest.mark.parametrize("T", [1, 33])
def test_forward_all_zero_and_all_one_masks(mask, T):
    g = _gen(5)
    x = torch.randn(T, 200, generator=g)
    b = random_packed(70, 40, generator=g, mask=mask)
    y = _check_forward(x, b, 9, "uniform", 1.0)
    if mask == "zeros":
        assert torch.count_nonzero(y) == 0


def test_forward_many_seeds():
    g = _gen(0)
    x = torch.randn(3, 100, generator=g)
    b = random_packed(50, 16, density=0.5, generator=g)
    outs = []
    for seed in [0, 1, 2**32, 2**63, 2**64 - 1, 123456789]:
        outs.append(_check_forward(x, b, seed, "rademacher", 1.0))
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("T", [5, 40])
def test_forward_noncontiguous_and_3d(T):
    g = _gen(T)
    big = torch.randn(2, T, 2 * 300, generator=g)
    x = big[..., ::2]                       # non-contiguous, 3-D
    assert not x.is_contiguous()
    b = random_packed(90, 24, generator=g)
    y = _check_forward(x, b, 3, "rademacher", 1.5)
    y2 = L.sparse_delta(x.contiguous().reshape(-1, 300), b, seed=3, scale=1.5)
    assert torch.equal(y.reshape(-1, 90), y2)
    xt = torch.randn(300, T, generator=g).t()   # transposed view
    _check_forward(xt, b, 3, "uniform", 1.0)


def test_forward_1d_input():
    x = torch.randn(64)
    b = random_packed(10, 8, generator=_gen(0))
    y = _check_forward(x, b, 1, "rademacher", 1.0)
    assert y.shape == (10,)


def test_deterministic():
    g = _gen(1)
    x = torch.randn(300, 512, generator=g)
    b = random_packed(256, 32, generator=g)
    y1 = L.sparse_delta(x, b, seed=1)
    y2 = L.sparse_delta(x, b, seed=1)
    assert torch.equal(y1, y2)


# ---- backward -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("T", [1, 7, 16, 17, 130])
def test_backward_against_reference(dtype, dist, T):
    g = _gen(T + 100)
    x = torch.randn(T, 333, generator=g).to(dtype).requires_grad_()
    b = random_packed(131, 33, generator=g, dtype=dtype)
    values = b.values.clone().requires_grad_()
    bb = b.with_values(values)
    y = L.sparse_delta(x, bb, seed=77, distribution=dist, scale=2.0)
    gy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(gy)
    rgx, rgv = reference_grads(x, b, 77, dist, 2.0, gy)
    bgx, bgv = baseline_grads(x, b, 77, dist, 2.0, gy)
    assert_within_rule(x.grad, rgx, bgx, "grad_x")
    assert_within_rule(values.grad, rgv, bgv, "grad_values")


@pytest.mark.parametrize("rank, inp, T, dtype", [(32, 4096 + 300, 20, torch.float32),
                                                 (128, 2500, 20, torch.float32),
                                                 (32, 3600, 600, torch.bfloat16)])
def test_several_a_tiles(rank, inp, T, dtype):
    # The GEMM paths (T > 16) generate A in column tiles of 1024-4096 columns by rank
    # (delta_common.h gemm_tile; narrower for bf16 x at large T, delta_common.cpp): cross
    # tile edges, with a last tile not a multiple of 128.
    g = _gen(rank + inp)
    x = torch.randn(T, inp, generator=g).to(dtype).requires_grad_()
    b = random_packed(70, rank, density=0.2, generator=g, dtype=dtype)
    values = b.values.clone().requires_grad_()
    _check_forward(x.detach(), b, 11, "uniform", 1.5, f"rank={rank} in={inp}")
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
def test_backward_decode(dtype, dist, T, rank):
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


def test_backward_decode_corrupt_mask():
    b = random_packed(130, 32, generator=_gen(2))
    bad = b.mask.clone()
    bad[70, 0] ^= 1 << 5   # chunk 1 now disagrees with offsets
    with pytest.raises(ValueError, match="offsets"):
        torch.ops.lori.sparse_delta_backward(torch.randn(1, 130), torch.randn(1, 64), bad,
                                             b.values, b.offsets, 32, 1, "rademacher", 1.0,
                                             True, True)


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_backward_needs_input_grad(need):
    g = _gen(3)
    x = torch.randn(9, 64, generator=g).requires_grad_(need[0])
    b = random_packed(40, 8, generator=g)
    values = b.values.clone().requires_grad_(need[1])
    L.sparse_delta(x, b.with_values(values), seed=1).sum().backward()
    assert (x.grad is not None) == need[0]
    assert (values.grad is not None) == need[1]
    gx, gv = torch.ops.lori.sparse_delta_backward(
        torch.ones(9, 40), x.detach(), b.mask, b.values, b.offsets, b.rank, 1, "rademacher", 1.0,
        need[0], need[1])
    assert (gx.numel() > 0) == need[0] and (gv.numel() > 0) == need[1]


def test_backward_empty_batch():
    b = random_packed(40, 8, generator=_gen(0))
    x = torch.randn(0, 64, requires_grad=True)
    values = b.values.clone().requires_grad_()
    L.sparse_delta(x, b.with_values(values), seed=1).sum().backward()
    assert x.grad.shape == (0, 64)
    assert torch.count_nonzero(values.grad) == 0


def test_gradcheck_float64():
    g = _gen(0)
    for T, inp, out, rank in [(3, 13, 11, 5), (20, 37, 70, 33)]:
        x = torch.randn(T, inp, generator=g, dtype=torch.float64, requires_grad=True)
        b = random_packed(out, rank, density=0.4, generator=g, dtype=torch.float64)
        v = b.values.clone().requires_grad_()
        for dist in DISTS:
            torch.autograd.gradcheck(
                lambda x, v: torch.ops.lori.sparse_delta(x, b.mask, v, b.offsets, rank, 5, dist, 1.5),
                (x, v))


def test_float64_forward_is_reference_exact():
    g = _gen(0)
    x = torch.randn(30, 50, generator=g, dtype=torch.float64)
    b = random_packed(20, 9, generator=g, dtype=torch.float64)
    y = L.sparse_delta(x, b, seed=3, scale=2.0)
    ref = reference.sparse_delta(x, b.to_dense(), 3, "rademacher", 2.0)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


# ---- op machinery ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    g = _gen(1)
    b = random_packed(70, 33, generator=g, dtype=dtype)
    for T in (1, 20):
        x = torch.randn(T, 45, generator=g).to(dtype)
        args = (x, b.mask, b.values, b.offsets, b.rank, 7, "uniform", 1.5)
        torch.library.opcheck(torch.ops.lori.sparse_delta.default, args)
        gy = torch.randn(T, 70, generator=g).to(dtype)
        torch.library.opcheck(torch.ops.lori.sparse_delta_backward.default,
                              (gy, *args, True, True))
    xg = torch.randn(4, 45, generator=g).to(dtype).requires_grad_()
    vg = b.values.clone().requires_grad_()
    torch.library.opcheck(torch.ops.lori.sparse_delta.default,
                          (xg, b.mask, vg, b.offsets, b.rank, 7, "rademacher", 1.0))


def test_torch_compile_fullgraph():
    g = _gen(2)
    b = random_packed(64, 16, generator=g)
    values = b.values.clone().requires_grad_()

    def f(x, v):
        y = torch.ops.lori.sparse_delta(x, b.mask, v, b.offsets, 16, 11, "rademacher", 2.0)
        return torch.nn.functional.gelu(y).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 48, generator=g, requires_grad=True)
    out = cf(x, values)
    out.backward()
    x2 = x.detach().clone().requires_grad_()
    v2 = values.detach().clone().requires_grad_()
    f(x2, v2).backward()
    torch.testing.assert_close(out, f(x2.detach(), v2.detach()))
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(values.grad, v2.grad)


def test_torch_compile_inductor():
    g = _gen(3)
    b = random_packed(32, 8, generator=g)
    f = torch.compile(lambda x: L.sparse_delta(x, b, seed=4) * 2, fullgraph=True)
    x = torch.randn(3, 40, generator=g)
    torch.testing.assert_close(f(x), L.sparse_delta(x, b, seed=4) * 2)


# ---- merge ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_merge_delta_matches_dense(dtype):
    g = _gen(4)
    b = random_packed(77, 20, generator=g, dtype=dtype)
    w = torch.randn(77, 1500, generator=g).to(dtype)
    w0 = w.clone()
    L.merge_delta_(w, b, seed=8, distribution="uniform", scale=0.7)
    ref = w0.double() + 0.7 * b.to_dense().double() @ reference.random_a(8, 20, 1500, "uniform").double()
    base = w0 + 0.7 * b.to_dense() @ reference.random_a(8, 20, 1500, "uniform", dtype=dtype)
    assert_within_rule(w, ref, base, "merge")
    L.merge_delta_(w, b, seed=8, distribution="uniform", scale=-0.7)
    assert_within_rule(w, w0.double(), base - 0.7 * b.to_dense() @ reference.random_a(
        8, 20, 1500, "uniform", dtype=dtype), "unmerge")


def test_merge_delta_opcheck():
    g = _gen(5)
    b = random_packed(30, 8, generator=g)
    torch.library.opcheck(torch.ops.lori.merge_delta_.default,
                          (torch.randn(30, 50, generator=g), b.mask, b.values, b.offsets, 8, 1,
                           "rademacher", 1.0))


# ---- bad input ------------------------------------------------------------------------------

def _args(T=3, inp=40, out=20, rank=8, dtype=torch.float32):
    g = _gen(9)
    b = random_packed(out, rank, generator=g, dtype=dtype)
    return [torch.randn(T, inp, generator=g).to(dtype), b.mask, b.values, b.offsets, rank, 1,
            "rademacher", 1.0]


def _call(args):
    return torch.ops.lori.sparse_delta(*args)


@pytest.mark.parametrize("mutate,exc,msg", bad_delta_arguments())
def test_bad_arguments_raise_clear_errors(mutate, exc, msg):
    a = _args()
    mutate(a)
    with pytest.raises(exc, match=msg):
        _call(a)


def test_corrupt_bitmask_is_caught_not_read_out_of_bounds():
    a = _args(out=130, rank=40)
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
                _call(op_args)
            with pytest.raises(ValueError, match=msg):
                torch.ops.lori.sparse_delta_backward(torch.ones(3, 130), *op_args, True, True)


def test_device_mismatch_is_named():
    a = _args()
    a[1] = a[1].to("meta")
    with pytest.raises((RuntimeError, NotImplementedError), match="mask|meta"):
        _call(a)


def test_grad_y_shape_checked():
    a = _args()
    with pytest.raises(ValueError, match="grad_y must have shape"):
        torch.ops.lori.sparse_delta_backward(torch.ones(3, 21), *a, True, True)


def test_python_wrapper_errors():
    b = random_packed(10, 4, generator=_gen(0))
    with pytest.raises(TypeError, match="PackedB"):
        L.sparse_delta(torch.randn(2, 5), b.to_dense(), seed=1)
    with pytest.raises(ValueError, match="seed"):
        L.sparse_delta(torch.randn(2, 5), b, seed=-3)


# ---- backend choice -------------------------------------------------------------------------

def test_backend_selection(monkeypatch):
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


# ---- the saved-h forward ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("T", [0, 3, 40])
def test_sparse_delta_fwd_returns_h_and_backward_reuses_it(dtype, T):
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

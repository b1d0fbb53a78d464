"""CUDA backend (csrc/cuda): bit-identical A, sparse_delta and its gradients within the tolerance
rule, merge_delta_, opcheck, and the host-side argument checks.

Everything that launches a kernel is skipped without a GPU; the registration test runs on any
machine whose build compiled the CUDA sources.
"""
from __future__ import annotations

import functools

import pytest
import torch

import lori_kernels  # noqa: F401  (registers torch.ops.lori)
from lori_kernels import reference, spec
from lori_kernels.packing import pack_bitmask

ops = torch.ops.lori
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
CUDA_OPS = ("_random_a_fill", "philox4x32_10", "sparse_delta", "sparse_delta_backward",
            "merge_delta_")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEED = 0x9E3779B97F4A7C15  # high bit set: exercises the uint64 seed path


def _cuda_registered(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lori::{name}", "CUDA")


def test_cuda_kernels_registered_together():
    """A CUDA build registers every CUDA kernel (a C++-only build registers none)."""
    registered = [_cuda_registered(n) for n in CUDA_OPS]
    if not any(registered):
        pytest.skip("lori_kernels._C was built without CUDA sources")
    assert all(registered), dict(zip(CUDA_OPS, registered))


# ---- helpers -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _ref_a(seed: int, rank: int, in_features: int, distribution: str) -> torch.Tensor:
    return reference.random_a(seed, rank, in_features, distribution)  # fp32, CPU


def _seed_arg(seed: int) -> int:
    return spec.check_seed(seed)


def make_b(out: int, rank: int, kind: str, dtype: torch.dtype, device, gen_seed: int = 0):
    g = torch.Generator().manual_seed(gen_seed)
    b = torch.randn(out, rank, generator=g, dtype=torch.float64)
    if kind == "sparse":
        mask = torch.rand(out, rank, generator=g) < 0.1
    elif kind == "zero":
        mask = torch.zeros(out, rank, dtype=torch.bool)
    else:  # "full"
        mask = torch.ones(out, rank, dtype=torch.bool)
    b_dense = (b * mask).to(dtype)  # the values the kernel sees, rounded once
    packed = pack_bitmask(b_dense, mask).to(device)
    return packed, b_dense.to(device)


def tol_ok(got: torch.Tensor, ref: torch.Tensor, torch_same_dtype: torch.Tensor) -> tuple:
    """err(kernel) <= 2 * err(plain torch in the same dtype) + 4 * eps * max|ref|."""
    ref = ref.double()
    err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
    base = (torch_same_dtype.double() - ref).abs().max().item() if ref.numel() else 0.0
    bound = 2 * base + 4 * torch.finfo(got.dtype).eps * (ref.abs().max().item() if ref.numel() else 0.0)
    return err <= bound, f"err={err:.3e} bound={bound:.3e} (torch err {base:.3e})"


def run_delta(x, packed, seed, dist, scale):
    return ops.sparse_delta(x, packed.mask, packed.values, packed.offsets, packed.rank,
                            _seed_arg(seed), dist, scale)


# ---- A and Philox: bit-identical across CUDA, C++ CPU and the reference ---------------------------

@needs_cuda
def test_philox_matches_cpu():
    g = torch.Generator().manual_seed(1)
    counters = torch.randint(-2**31, 2**31, (4099, 4), generator=g, dtype=torch.int64)
    counters = counters.to(torch.int32)
    for seed in (0, 1, SEED, 2**64 - 1):
        cpu = ops.philox4x32_10(counters, _seed_arg(seed))
        gpu = ops.philox4x32_10(counters.cuda(), _seed_arg(seed)).cpu()
        assert torch.equal(cpu, gpu)


@needs_cuda
@pytest.mark.parametrize("distribution", ["rademacher", "uniform"])
@pytest.mark.parametrize("rank,in_features,cols", [
    (32, 4096, None), (7, 341, None), (33, 1000, (5, 777)), (1, 129, (128, 129)),
    (256, 200, (64, 200))])
def test_random_a_bit_identical(distribution, rank, in_features, cols):
    c0, c1 = cols or (0, in_features)
    ref = reference.random_a(SEED, rank, in_features, distribution, col_start=c0, col_end=c1)
    cpu = lori_kernels.random_a(SEED, rank, in_features, distribution=distribution, columns=cols)
    gpu = lori_kernels.random_a(SEED, rank, in_features, distribution=distribution, columns=cols,
                                device="cuda")
    assert torch.equal(ref, cpu)
    assert torch.equal(ref, gpu.cpu())
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        got = lori_kernels.random_a(SEED, rank, in_features, distribution=distribution,
                                    columns=cols, device="cuda", dtype=dtype)
        assert torch.equal(got.cpu(), ref.to(dtype))


@needs_cuda
def test_random_a_fill_non_contiguous_out():
    out = torch.empty(100, 16, device="cuda").t()  # (16, 100), column-major
    ops._random_a_fill(out, _seed_arg(SEED), 300, 50, "uniform")
    ref = reference.random_a(SEED, 16, 300, "uniform", col_start=50, col_end=150)
    assert torch.equal(out.cpu(), ref)


# ---- sparse_delta forward -------------------------------------------------------------------------

SHAPES = [(4096, 4096, 32), (341, 129, 7), (1000, 70, 33), (72, 200, 64), (136, 65, 256)]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 7, 513, 4096])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("distribution", ["rademacher", "uniform"])
def test_sparse_delta_forward(dtype, T, shape, distribution):
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


@needs_cuda
@pytest.mark.parametrize("kind", ["zero", "full"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 513])
def test_sparse_delta_extreme_masks(kind, dtype, T):
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


@needs_cuda
def test_sparse_delta_non_contiguous_and_batched():
    packed, b = make_b(96, 32, "sparse", torch.float32, "cuda")
    big = torch.randn(3, 5, 2 * 200, device="cuda")
    x = big[..., ::2]  # (3, 5, 200), non-contiguous
    y = run_delta(x, packed, 5, "uniform", 1.0)
    y2 = run_delta(x.contiguous(), packed, 5, "uniform", 1.0)
    assert y.shape == (3, 5, 96)
    assert torch.equal(y, y2)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    packed, _ = make_b(200, 32, "sparse", dtype, "cpu")
    x = torch.randn(37, 257).to(dtype)
    y_cpu = run_delta(x, packed, SEED, "rademacher", 0.5)
    y_gpu = run_delta(x.cuda(), packed.to("cuda"), SEED, "rademacher", 0.5).cpu()
    ref = y_cpu.double()
    err = (y_gpu.double() - ref).abs().max().item()
    assert err <= 8 * torch.finfo(dtype).eps * ref.abs().max().item()


@needs_cuda
def test_sparse_delta_deterministic():
    packed, _ = make_b(4096, 32, "sparse", torch.bfloat16, "cuda")
    x = torch.randn(256, 4096, device="cuda").to(torch.bfloat16)
    assert torch.equal(run_delta(x, packed, 1, "rademacher", 1.0),
                       run_delta(x, packed, 1, "rademacher", 1.0))


# ---- gradients --------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 513, 4096])
@pytest.mark.parametrize("shape", [(4096, 4096, 32), (341, 129, 7), (200, 72, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_sparse_delta_backward(dtype, T, shape):
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


@needs_cuda
def test_backward_empty_batch_and_zero_mask():
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


@needs_cuda
def test_gradcheck_float64():
    packed, _ = make_b(65, 33, "sparse", torch.float64, "cuda", gen_seed=3)
    x = torch.randn(3, 70, device="cuda", dtype=torch.float64, requires_grad=True)
    values = packed.values.clone().requires_grad_(True)
    f = lambda x_, v_: lori_kernels.sparse_delta(x_, packed.with_values(v_), seed=SEED,  # noqa: E731
                                                 distribution="uniform", scale=0.7)
    assert torch.autograd.gradcheck(f, (x, values))


@needs_cuda
def test_float64_matches_reference_tightly():
    packed, b = make_b(65, 33, "sparse", torch.float64, "cuda", gen_seed=4)
    x = torch.randn(9, 70, device="cuda", dtype=torch.float64)
    y = run_delta(x, packed, SEED, "uniform", 0.7)
    a = _ref_a(SEED, 33, 70, "uniform").cuda().double()
    ref = (x @ a.T) @ b.T * 0.7
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


# ---- merge_delta_ ------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(4096, 1024, 32), (129, 341, 7), (70, 65, 256)],
                         ids=lambda s: "x".join(map(str, s)))
def test_merge_delta(dtype, shape):
    in_f, out_f, rank = shape
    packed, b = make_b(out_f, rank, "sparse", dtype, "cuda", gen_seed=rank)
    w0 = torch.randn(out_f, in_f, device="cuda").to(dtype)
    w = w0.clone()
    ops.merge_delta_(w, packed.mask, packed.values, packed.offsets, rank, _seed_arg(SEED),
                     "uniform", 2.0)
    a = _ref_a(SEED, rank, in_f, "uniform").cuda()
    ref = w0.double() + 2.0 * (b.double() @ a.double())
    plain = w0 + 2.0 * (b @ a.to(dtype))
    ok, msg = tol_ok(w, ref, plain)
    assert ok, msg
    # Non-contiguous weight: same result.
    wt = w0.t().contiguous().t()
    ops.merge_delta_(wt, packed.mask, packed.values, packed.offsets, rank, _seed_arg(SEED),
                     "uniform", 2.0)
    assert torch.equal(wt, w)


# ---- opcheck -----------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cuda(dtype):
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


# ---- host-side checks ------------------------------------------------------------------------------

@needs_cuda
def test_device_mismatch_errors():
    packed, _ = make_b(64, 32, "sparse", torch.float32, "cuda")
    x = torch.randn(2, 50, device="cuda")
    with pytest.raises(RuntimeError, match="mask is on cpu but x is on cuda"):
        ops.sparse_delta(x, packed.mask.cpu(), packed.values, packed.offsets, 32, 1,
                         "rademacher", 1.0)
    with pytest.raises(RuntimeError, match="offsets is on cpu"):
        ops.sparse_delta(x, packed.mask, packed.values, packed.offsets.cpu(), 32, 1,
                         "rademacher", 1.0)
    with pytest.raises(RuntimeError, match="values is on cpu"):
        ops.sparse_delta(x, packed.mask, packed.values.cpu(), packed.offsets, 32, 1,
                         "rademacher", 1.0)
    gy = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="grad_y is on cpu"):
        ops.sparse_delta_backward(gy, x, packed.mask, packed.values, packed.offsets, 32, 1,
                                  "rademacher", 1.0, True, True)


@needs_cuda
def test_argument_errors():
    packed, _ = make_b(64, 32, "sparse", torch.float32, "cuda")
    x = torch.randn(2, 50, device="cuda")
    args = lambda **kw: {**dict(x=x, mask=packed.mask, values=packed.values,  # noqa: E731
                                offsets=packed.offsets, rank=32, seed=1,
                                distribution="rademacher", scale=1.0), **kw}
    call = lambda kw: ops.sparse_delta(*args(**kw).values())  # noqa: E731
    with pytest.raises(TypeError, match="values dtype"):
        call(dict(values=packed.values.half()))
    with pytest.raises(ValueError, match="mask must have shape"):
        call(dict(rank=33))
    with pytest.raises(ValueError, match="distribution must be"):
        call(dict(distribution="gaussian"))
    with pytest.raises(ValueError, match="offsets must have shape"):
        call(dict(offsets=packed.offsets[:-1]))
    with pytest.raises(TypeError, match="x must be float32"):
        call(dict(x=x.to(torch.int32)))
    with pytest.raises(ValueError, match="grad_y must have shape"):
        ops.sparse_delta_backward(torch.randn(2, 63, device="cuda"), x, packed.mask,
                                  packed.values, packed.offsets, 32, 1, "rademacher", 1.0,
                                  True, True)
    with pytest.raises(ValueError, match="weight has"):
        ops.merge_delta_(torch.randn(63, 50, device="cuda"), packed.mask, packed.values,
                         packed.offsets, 32, 1, "rademacher", 1.0)


@needs_cuda
def test_corrupt_b_never_reads_out_of_bounds():
    """The CUDA backend trusts offsets (no per-call mask scan) but clamps every read."""
    packed, _ = make_b(200, 40, "sparse", torch.float32, "cuda")
    x = torch.randn(33, 128, device="cuda")
    bad_offsets = [packed.offsets * 1000, -packed.offsets.abs() - 5,
                   torch.full_like(packed.offsets, 2**31 - 1)]
    bad_masks = [torch.full_like(packed.mask, -1)]  # bits past rank, far too many entries
    for off in bad_offsets:
        ops.sparse_delta(x, packed.mask, packed.values, off, 40, 1, "rademacher", 1.0)
    for mask in bad_masks:
        ops.sparse_delta(x, mask, packed.values, packed.offsets, 40, 1, "rademacher", 1.0)
        ops.sparse_delta_backward(torch.randn(33, 200, device="cuda"), x, mask, packed.values,
                                  packed.offsets, 40, 1, "rademacher", 1.0, True, True)
        w = torch.zeros(200, 128, device="cuda")
        ops.merge_delta_(w, mask, packed.values, packed.offsets, 40, 1, "rademacher", 1.0)
    torch.cuda.synchronize()  # an illegal access would surface here

"""CUDA backend (csrc/cuda): bit-identical A, sparse_delta and its gradients within the tolerance
rule, merge_delta_, batched_sparse_delta (forward, gradients, validation), opcheck, and the
host-side argument checks.

Everything that launches a kernel is skipped without a GPU; the registration test runs on any
machine whose build compiled the CUDA sources.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import lori_kernels  # noqa: F401  (registers torch.ops.lori)
import lori_kernels as L
from lori_kernels import reference, spec
from lori_kernels.packing import pack_bitmask
from lori_kernels.testing import random_packed, tolerance_bound

from batched_cases import MIXES, make_pool, mix_ids, mutate_arg

ops = torch.ops.lori
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
CUDA_OPS = ("_random_a_fill", "philox4x32_10", "sparse_delta", "sparse_delta_fwd",
            "sparse_delta_backward", "merge_delta_", "batched_sparse_delta",
            "batched_sparse_delta_backward")
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
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("T", [0, 1, 7, 513])
@pytest.mark.parametrize("in_f", [341, 512])
@pytest.mark.parametrize("dist", ["uniform", "rademacher"])
def test_sparse_delta_fwd_returns_h_and_backward_reuses_it(dist, in_f, dtype, T):
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
@pytest.mark.parametrize("op", ["sparse_delta", "sparse_delta_fwd"])
def test_forward_errors_match_cpu(op):
    """Both forward ops report argument errors as "sparse_delta: ...", on CUDA as on the CPU."""
    packed, _ = make_b(64, 32, "sparse", torch.float32, "cpu")
    msgs = []
    for dev in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="^sparse_delta: mask must have shape") as e:
            getattr(ops, op)(torch.randn(2, 50, device=dev), packed.mask.to(dev),
                             packed.values.to(dev), packed.offsets.to(dev), 33, 1, "rademacher",
                             1.0)
        msgs.append(str(e.value).splitlines()[0])
    assert msgs[0] == msgs[1]


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


# ---- batched_sparse_delta (many adapters of one pool per batch) -------------------------------------
# Every case runs the CUDA op against the float64 reference (tolerance rule: plain torch in the
# same dtype on the GPU is the yardstick) and against the CPU op on the same pool and tokens.

B_IN, B_OUT, B_RANK = 256, 320, 32


def _bpool(n, inp, out, rank, dtype, seed, device):
    """tests/batched_cases.py's make_pool (n adapters differing in sparsity, seed, distribution
    and scale), on device."""
    return make_pool(n, inp, out, rank, dtype=dtype, seed=seed).to(device)


@functools.lru_cache(maxsize=None)
def _bpools(n, inp=B_IN, out=B_OUT, rank=B_RANK, dtype=torch.float32, seed=1):
    """(CPU pool, CUDA pool) with the same adapters. Treat as read-only."""
    cpu = _bpool(n, inp, out, rank, dtype, seed, "cpu")
    return cpu, copy.deepcopy(cpu).to("cuda")


@functools.lru_cache(maxsize=None)
def _bref_a(seed: int, rank: int, in_features: int, distribution: str) -> torch.Tensor:
    """A in fp32 from the C++ CPU kernel: bit-identical to reference.random_a (test_spec.py and
    test_random_a_bit_identical check it) and ~300x faster at 32 x 4096."""
    return lori_kernels.random_a(seed, rank, in_features, distribution=distribution)


def _bargs(pool, x, ids, values=None):
    masks, vals, starts, offsets, seeds, scales, dists, rank = pool.op_args()
    return (x, ids, masks, vals if values is None else values, starts, offsets, seeds, scales,
            dists, rank)


def _bref(x, ids, pool_cpu):
    """(float64 reference on the CPU, plain torch in x's dtype on x's device), per token."""
    T, dev = x.shape[0], x.device
    ids = ids.cpu()
    ref = torch.zeros(T, pool_cpu.out_features, dtype=torch.float64)
    base = torch.zeros(T, pool_cpu.out_features, dtype=x.dtype, device=dev)
    xc = x.cpu()
    for a in ids.unique().tolist():
        if a < 0:
            continue
        e = pool_cpu.get(pool_cpu._names[a])
        sel = (ids == a).nonzero().flatten()
        a32 = _bref_a(e.seed, pool_cpu.rank, x.shape[-1], e.distribution)
        bd = e.packed.to_dense()
        ref[sel] = (xc[sel].double() @ a32.double().T) @ bd.double().T * e.scale
        base[sel.to(dev)] = reference.dense_lora(x[sel.to(dev)], a32.to(dev, x.dtype),
                                                 bd.to(dev, x.dtype), e.scale)
    return ref, base


def _row_bounds(ref, plain, ids):
    """(T, 1) float64: each token row gets the tolerance-rule bound of its own adapter's rows
    (-1 rows: their own group, where ref = 0), so an adapter with small outputs (low scale or
    density) is not judged by a large adapter's bound."""
    ids = ids.cpu().reshape(-1)
    bound = torch.empty(ref.shape[0], 1, dtype=torch.float64)
    for a in ids.unique().tolist():
        sel = ids == a
        bound[sel] = tolerance_bound(ref[sel], plain[sel.to(plain.device)])
    return bound


def _value_bounds(ref, plain, ids, pool_cpu):
    """Bounds for grad_values: each used adapter's value range gets the tolerance-rule bound of
    its own gradients; everything else (unused adapters, gaps) must be exactly 0."""
    bound = torch.full(ref.shape, 1e-30, dtype=torch.float64)
    for a in ids.cpu().unique().tolist():
        if a < 0:
            continue
        s, k = int(pool_cpu.value_starts[a]), pool_cpu.get(pool_cpu._names[a]).packed.nnz
        bound[s:s + k] = tolerance_bound(ref[s:s + k], plain[s:s + k])
    return bound


def _assert_within(got, want, bound, what):
    """|got - want| <= bound elementwise (bound broadcast to want's shape); want on the CPU."""
    err = (got.double().cpu() - want.double()).abs()
    bound = bound.expand_as(err)
    bad = err > bound
    if bad.any():
        i = (err / bound).flatten().argmax().item()
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(f"{what}: {bad.sum().item()} elements over the bound; worst at "
                             f"{idx}: {err.flatten()[i]:.3e} > {bound.flatten()[i]:.3e}")


def _bcheck(y, x, ids, pools, what=""):
    """y (CUDA) within the tolerance rule of the float64 reference and of the CPU op, with the
    bound computed per adapter (_row_bounds)."""
    pool_cpu, _ = pools
    assert y.is_cuda and y.dtype == x.dtype
    assert y.shape == (*x.shape[:-1], pool_cpu.out_features), what
    if y.numel() == 0:
        return
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    ref, base = _bref(x2, ids, pool_cpu)
    bound = _row_bounds(ref, base, ids)
    _assert_within(y2, ref, bound, f"{what}: error vs float64")
    y_cpu = torch.ops.lori.batched_sparse_delta(*_bargs(pool_cpu, x2.cpu(), ids.cpu()))
    _assert_within(y2, y_cpu, bound, f"{what}: difference from the CPU op")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 7, 513])
@pytest.mark.parametrize("idle", [False, True])
@pytest.mark.parametrize("mix", MIXES)
def test_batched_forward_mixes(mix, idle, T, dtype):
    pools = _bpools(64, dtype=dtype)
    g = torch.Generator().manual_seed(T * 7 + len(mix))
    ids = mix_ids(mix, T, 64, idle, g).to(torch.int32)
    x = torch.randn(T, B_IN, generator=g).to(dtype).cuda()
    y = torch.ops.lori.batched_sparse_delta(*_bargs(pools[1], x, ids.cuda()))
    _bcheck(y, x, ids, pools, f"{mix} idle={idle} T={T}")
    if idle and T:
        assert torch.count_nonzero(y[ids.cuda() < 0]) == 0


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True], ids=["delta", "base"])
@pytest.mark.parametrize("n", [6, 8])
def test_batched_forward_large_tiles(n, with_base, dtype):
    """A pool of capacity 8: T = 513 tokens over at most 8 groups averages more than 16 tokens
    per group, so the forward runs its 64-token tiles (forward_mixes' capacity-64 pool gets
    16-token tiles); -1 tokens mixed in, with and without base."""
    pools = _bpools(n, dtype=dtype, seed=17)
    assert pools[1].capacity == 8
    T = 513
    g = torch.Generator().manual_seed(n + 100)
    ids = torch.randint(0, n, (T,), generator=g)
    ids = torch.where(torch.rand(T, generator=g) < 0.2, -1, ids)
    x = torch.randn(T, B_IN, generator=g).to(dtype).cuda()
    args = _bargs(pools[1], x, ids.cuda())
    delta = torch.ops.lori.batched_sparse_delta(*args)
    _bcheck(delta, x, ids, pools, f"n={n} {dtype}")
    idle = ids.cuda() < 0
    assert torch.count_nonzero(delta[idle]) == 0
    if not with_base:
        return
    base = torch.randn(T, B_OUT, generator=g).to(dtype).cuda()
    y = torch.ops.lori.batched_sparse_delta(*args, base)
    assert torch.equal(y[idle], base[idle])
    # base + delta rounded once: within one ulp of the exact sum (+ the delta's own error)
    ref, plain = _bref(x, ids, pools[0])
    exact = base.double().cpu() + ref
    _assert_within(y, exact, exact.abs() * torch.finfo(dtype).eps + _row_bounds(ref, plain, ids),
                   "base + delta")


@needs_cuda
@pytest.mark.parametrize("shape", [(300, 200, 40), (70, 130, 256), (1100, 1100, 33), (45, 70, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("T", [1, 16, 17, 300])
def test_batched_shapes_and_tiles(shape, T):
    """Odd shapes, ranks over two mask words and > 128 (small tiles), one-token segments and
    segments longer than a tile, contiguous runs and interleaved tokens."""
    inp, out, rank = shape
    pools = _bpools(6, inp, out, rank, torch.float32, seed=2)
    g = torch.Generator().manual_seed(T + rank)
    runs = torch.arange(6).repeat_interleave((T + 5) // 6)[:T]
    for ids in (runs, runs[torch.randperm(T, generator=g)]):
        x = torch.randn(T, inp, generator=g).cuda()
        y = torch.ops.lori.batched_sparse_delta(*_bargs(pools[1], x, ids.cuda()))
        _bcheck(y, x, ids, pools, f"{shape} T={T}")


@needs_cuda
@pytest.mark.parametrize("T,k", [(64, 1), (64, 8), (64, 64), (513, 8)])
def test_batched_full_size_bf16(T, k):
    """in = out = 4096, rank 32 (the benchmark shape), decode over 1/8/64 adapters and prefill."""
    pools = _bpools(64, 4096, 4096, 32, torch.bfloat16, seed=3)
    g = torch.Generator().manual_seed(T + k)
    ids = torch.randperm(T, generator=g) % k
    x = torch.randn(T, 4096, generator=g).bfloat16().cuda()
    y = torch.ops.lori.batched_sparse_delta(*_bargs(pools[1], x, ids.cuda()))
    _bcheck(y, x, ids, pools, f"T={T} k={k}")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_batched_accumulate_3d_noncontiguous(dtype):
    pools = _bpools(5, dtype=dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    big = torch.randn(2, 6, 2 * B_IN, generator=g).to(dtype).cuda()
    x = big[..., ::2]  # (2, 6, IN), non-contiguous
    ids_big = torch.tensor([0, 9, 1, 9, -1, 9, 4, 9, 4, 9, 2, 9, 3, 9, -1, 9, 0, 9, 0, 9, 1, 9, 2, 9])
    ids = ids_big[::2].cuda()
    base = torch.randn(2, 6, B_OUT, generator=g).to(dtype).cuda()
    y = torch.ops.lori.batched_sparse_delta(*_bargs(pools[1], x, ids), base)
    delta = torch.ops.lori.batched_sparse_delta(*_bargs(pools[1], x, ids))
    assert y.shape == (2, 6, B_OUT) and delta.shape == (2, 6, B_OUT)
    assert torch.equal(delta, torch.ops.lori.batched_sparse_delta(
        *_bargs(pools[1], x.contiguous(), ids.contiguous())))
    _bcheck(delta, x, ids.cpu(), pools)
    idle = ids.reshape(-1) < 0
    assert torch.equal(y.reshape(-1, B_OUT)[idle], base.reshape(-1, B_OUT)[idle])
    assert torch.count_nonzero(delta.reshape(-1, B_OUT)[idle]) == 0
    # base + delta rounded once: within one ulp of the exact sum (+ the delta's own error)
    ref, plain = _bref(x.reshape(-1, B_IN), ids.cpu(), pools[0])
    exact = base.reshape(-1, B_OUT).double().cpu() + ref
    slack = _row_bounds(ref, plain, ids)
    _assert_within(y.reshape(-1, B_OUT), exact, exact.abs() * torch.finfo(dtype).eps + slack,
                   "base + delta")


@needs_cuda
def test_batched_float64_tight():
    pools = _bpools(4, 50, 70, 9, torch.float64, seed=6)
    ids = torch.tensor([3, 0, -1, 3, 1, 2, 2, 0])
    x = torch.randn(8, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y = torch.ops.lori.batched_sparse_delta(*_bargs(pools[1], x.cuda(), ids.cuda()))
    ref, _ = _bref(x, ids, pools[0])
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-12, atol=1e-12)


@needs_cuda
def test_batched_deterministic_and_unvalidated_path(monkeypatch):
    """Repeat calls are bitwise equal; validation off (no sync; grids sized by the tile
    bound, so the split-K slicing may differ) stays within the rule."""
    pools = _bpools(64, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(8)
    ids = mix_ids("zipf64", 300, 64, True, g).cuda()
    x = torch.randn(300, B_IN, generator=g).bfloat16().cuda()
    gy = torch.randn(300, B_OUT, generator=g).bfloat16().cuda()
    args = _bargs(pools[1], x, ids)
    y1 = torch.ops.lori.batched_sparse_delta(*args)
    g1 = torch.ops.lori.batched_sparse_delta_backward(gy, *args, True, True)
    assert torch.equal(y1, torch.ops.lori.batched_sparse_delta(*args))
    assert all(torch.equal(a, b) for a, b in
               zip(g1, torch.ops.lori.batched_sparse_delta_backward(gy, *args, True, True)))
    L.set_validation("off")
    _bcheck(torch.ops.lori.batched_sparse_delta(*args), x, ids.cpu(), pools, "unvalidated")
    g2 = torch.ops.lori.batched_sparse_delta_backward(gy, *args, True, True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def _bgrad_refs(x, ids, pool_cpu, gy):
    """(grad_x, grad_values) of the float64 reference (CPU autograd) and of plain torch in x's
    dtype on x's device, for y[t] = scale_a (x[t] A_a^T) B_a^T."""
    out = {}
    ids = ids.cpu()
    for kind, dev, dt in (("ref", torch.device("cpu"), torch.float64),
                          ("plain", x.device, x.dtype)):
        xx = x.detach().to(dev, dt).requires_grad_()
        vv = pool_cpu.values.detach().to(dev, dt).requires_grad_()
        y = torch.zeros(x.shape[0], pool_cpu.out_features, dtype=dt, device=dev)
        for a in ids.unique().tolist():
            if a < 0:
                continue
            e = pool_cpu.get(pool_cpu._names[a])
            sel = (ids == a).nonzero().flatten().to(dev)
            start, nnz = int(pool_cpu.value_starts[a]), e.packed.nnz
            d = torch.zeros(pool_cpu.out_features, pool_cpu.rank, dtype=dt, device=dev)
            d = d.masked_scatter(e.packed.bool_mask().to(dev), vv[start:start + nnz])
            a_ = _bref_a(e.seed, pool_cpu.rank, x.shape[-1], e.distribution).to(dev, dt)
            y = y.index_add(0, sel, reference.dense_lora(xx[sel], a_, d, e.scale))
        y.backward(gy.to(dev, dt))
        out[kind] = (xx.grad, vv.grad)
    return out["ref"], out["plain"]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 513])
@pytest.mark.parametrize("mix", ["distinct", "uniform8", "identical"])
@pytest.mark.parametrize("shape", [(B_IN, B_OUT, B_RANK), (300, 200, 40), (70, 130, 256)],
                         ids=lambda s: "x".join(map(str, s)))
def test_batched_backward(shape, mix, T, dtype):
    """grad_x and the grad of every used adapter's values vs float64 autograd (the rule) and the
    CPU op; unused adapters and -1 tokens get exactly 0. Shapes: one mask word with multiples
    of 64; two words with a partial last chunk, column tile and mask word; rank 256 (8 words,
    small tiles) with in_features under one column tile."""
    inp, out, rank = shape
    n = 12
    pools = _bpools(n, inp, out, rank, dtype, seed=9)
    g = torch.Generator().manual_seed(T + len(mix))
    ids = mix_ids(mix, T, n, True, g)
    x = torch.randn(T, inp, generator=g).to(dtype)
    gy = torch.randn(T, out, generator=g).to(dtype)
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(
        gy.cuda(), *_bargs(pools[1], x.cuda(), ids.cuda()), True, True)
    gx_cpu, gv_cpu = torch.ops.lori.batched_sparse_delta_backward(
        gy, *_bargs(pools[0], x, ids), True, True)
    (rx, rv), (px, pv) = _bgrad_refs(x.cuda(), ids, pools[0], gy.cuda())
    bounds = (_row_bounds(rx, px, ids), _value_bounds(rv, pv, ids, pools[0]))
    for got, cpu, r, bound, what in ((gx, gx_cpu, rx, bounds[0], "grad_x"),
                                     (gv, gv_cpu, rv, bounds[1], "grad_values")):
        assert got.shape == cpu.shape and got.dtype == dtype, what
        _assert_within(got, r, bound, f"{what} vs float64")
        _assert_within(got, cpu, bound, f"{what} vs CPU op")
    used = set(ids.tolist())
    for a in range(n):
        if a not in used:
            s, k = int(pools[0].value_starts[a]), pools[0].get(f"a{a}").packed.nnz
            assert torch.count_nonzero(gv[s:s + k]) == 0
    assert torch.count_nonzero(gx[ids.cuda() < 0]) == 0


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_backward_single_and_multi_tile_groups(dtype, monkeypatch):
    """grad_values cuts each adapter's tokens into tiles of >= 32: adapters with hundreds of
    tokens (several tiles, summed through per-slot partials) next to adapters with a few tokens
    (one tile, added straight into grad_values) and -1 tokens. Within the rule per adapter,
    bitwise repeatable, and the unvalidated path (slot buffer sized by its bound) agrees."""
    n = 40
    pools = _bpools(n, dtype=dtype, seed=18)
    g = torch.Generator().manual_seed(19)
    light = torch.arange(3, n).repeat_interleave(torch.randint(1, 9, (n - 3,), generator=g))
    ids = torch.cat([torch.zeros(900, dtype=torch.long), torch.ones(500, dtype=torch.long),
                     torch.full((100,), 2), light, torch.full((50,), -1)])
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    T = ids.numel()
    x = torch.randn(T, B_IN, generator=g).to(dtype)
    gy = torch.randn(T, B_OUT, generator=g).to(dtype)
    args = (gy.cuda(), *_bargs(pools[1], x.cuda(), ids.cuda()), True, True)
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(*args)
    (rx, rv), (px, pv) = _bgrad_refs(x.cuda(), ids, pools[0], gy.cuda())
    _assert_within(gx, rx, _row_bounds(rx, px, ids), "grad_x vs float64")
    _assert_within(gv, rv, _value_bounds(rv, pv, ids, pools[0]), "grad_values vs float64")
    gx2, gv2 = torch.ops.lori.batched_sparse_delta_backward(*args)
    assert torch.equal(gx, gx2) and torch.equal(gv, gv2)
    L.set_validation("off")
    gx3, gv3 = torch.ops.lori.batched_sparse_delta_backward(*args)
    torch.testing.assert_close(gx3, gx)
    torch.testing.assert_close(gv3, gv)


@needs_cuda
@pytest.mark.parametrize("validate", ["1", "0"])
def test_batched_backward_memory_does_not_grow_with_adapters(validate, monkeypatch):
    """256 adapters with 4 tokens each: grad_values' per-tile partials would be a
    (tiles, out, rank) buffer of >= 256 x 1024 x 64 fp32 = 64 MiB; single-tile groups add straight
    into grad_values, so the backward's peak stays a fraction of that."""
    L.set_validation(validate)
    n, inp, out, rank, T = 256, 256, 1024, 64, 1024
    pools = _bpools(n, inp, out, rank, torch.float32, seed=20)
    g = torch.Generator().manual_seed(21)
    ids = (torch.arange(T) % n)[torch.randperm(T, generator=g)].cuda()
    x = torch.randn(T, inp, generator=g).cuda()
    gy = torch.randn(T, out, generator=g).cuda()
    args = (gy, *_bargs(pools[1], x, ids), True, True)
    torch.ops.lori.batched_sparse_delta_backward(*args)  # warm-up (allocator, attributes)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(*args)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    per_group_buffer = n * out * rank * 4
    assert extra < per_group_buffer // 2, f"{extra / 2**20:.1f} MiB"
    if validate == "1":
        (rx, rv), (px, pv) = _bgrad_refs(x, ids, pools[0], gy)
        _assert_within(gv, rv, _value_bounds(rv, pv, ids, pools[0]), "grad_values vs float64")


@needs_cuda
def test_batched_autograd_flags_and_empty():
    pools = _bpools(3, seed=10)
    pool = pools[1]
    ids = torch.tensor([0, 2, 1, -1], device="cuda")
    x = torch.randn(4, B_IN, device="cuda", requires_grad=True)
    v = pool.values.detach().clone().requires_grad_()
    base = torch.randn(4, B_OUT, device="cuda", requires_grad=True)
    y = torch.ops.lori.batched_sparse_delta(*_bargs(pool, x, ids, v), base)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert torch.equal(base.grad, gy)
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(gy, *_bargs(pool, x.detach(), ids),
                                                          True, True)
    assert torch.equal(x.grad, gx) and torch.equal(v.grad, gv)
    args = (gy, *_bargs(pool, x.detach(), ids))
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(*args, True, False)
    assert gx.shape == x.shape and gv.numel() == 0
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(*args, False, True)
    assert gx.numel() == 0 and gv.shape == pool.values.shape
    # T = 0, and a batch with no adapter at all
    x0 = torch.randn(0, B_IN, device="cuda")
    ids0 = torch.zeros(0, dtype=torch.int32, device="cuda")
    assert torch.ops.lori.batched_sparse_delta(*_bargs(pool, x0, ids0)).shape == (0, B_OUT)
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(
        torch.randn(0, B_OUT, device="cuda"), *_bargs(pool, x0, ids0), True, True)
    assert gx.shape == (0, B_IN) and torch.count_nonzero(gv) == 0
    none = torch.full((4,), -1, device="cuda")
    assert torch.count_nonzero(torch.ops.lori.batched_sparse_delta(*_bargs(pool, x.detach(), none))) == 0
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(gy, *_bargs(pool, x.detach(), none),
                                                          True, True)
    assert torch.count_nonzero(gx) == 0 and torch.count_nonzero(gv) == 0


@needs_cuda
def test_batched_gradcheck_float64():
    pools = _bpools(3, 13, 66, 5, torch.float64, seed=11)
    masks, values, starts, offsets, seeds, scales, dists, rank = pools[1].op_args()
    ids = torch.tensor([2, 0, -1, 2, 1, 0, 2], device="cuda")
    g = torch.Generator().manual_seed(12)
    x = torch.randn(7, 13, generator=g, dtype=torch.float64).cuda().requires_grad_()
    v = values.detach().clone().requires_grad_()
    base = torch.randn(7, 66, generator=g, dtype=torch.float64).cuda()
    assert torch.autograd.gradcheck(
        lambda x_, v_: torch.ops.lori.batched_sparse_delta(
            x_, ids, masks, v_, starts, offsets, seeds, scales, dists, rank, base), (x, v))


@needs_cuda
def test_batched_shared_value_ranges_sum_their_gradients():
    b = random_packed(40, 8, generator=torch.Generator().manual_seed(1)).to("cuda")
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2)).cuda()
    ids = torch.tensor([0, 1, 0, 1], dtype=torch.int32, device="cuda")
    v = b.values.clone().requires_grad_()
    dev = dict(device="cuda")
    y = torch.ops.lori.batched_sparse_delta(
        x, ids, torch.stack([b.mask, b.mask]), v, torch.tensor([0, 0], **dev),
        torch.stack([b.offsets, b.offsets]), torch.tensor([3, 3], **dev),
        torch.tensor([1.0, 1.0], **dev), torch.tensor([1, 1], dtype=torch.int32, **dev), 8)
    y.sum().backward()
    v2 = b.values.clone().requires_grad_()
    ops.sparse_delta(x, b.mask, v2, b.offsets, 8, 3, "rademacher", 1.0).sum().backward()
    torch.testing.assert_close(v.grad, v2.grad)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_opcheck_cuda(dtype):
    pools = _bpools(4, 45, 70, 33, dtype, seed=13)
    pool = pools[1]
    g = torch.Generator().manual_seed(14)
    for ids in (torch.tensor([1, -1, 3, 1, 0]), torch.tensor([2] * 20 + [-1, 0])):
        T = ids.numel()
        x = torch.randn(T, 45, generator=g).to(dtype).cuda()
        args = _bargs(pool, x, ids.cuda())
        torch.library.opcheck(ops.batched_sparse_delta.default, args)
        base = torch.randn(T, 70, generator=g).to(dtype).cuda()
        torch.library.opcheck(ops.batched_sparse_delta.default, (*args, base))
        gy = torch.randn(T, 70, generator=g).to(dtype).cuda()
        torch.library.opcheck(ops.batched_sparse_delta_backward.default, (gy, *args, True, True))
    xg = torch.randn(5, 45, generator=g).to(dtype).cuda().requires_grad_()
    vg = pool.values.clone().requires_grad_()
    torch.library.opcheck(ops.batched_sparse_delta.default,
                          _bargs(pool, xg, torch.tensor([0, 1, 2, 3, -1], device="cuda"), vg))


def _bad_args(T=4):
    pool = _bpools(3, seed=15)[1]
    x = torch.randn(T, B_IN, generator=torch.Generator().manual_seed(0)).cuda()
    return list(_bargs(pool, x, torch.zeros(T, dtype=torch.int32, device="cuda")))


@needs_cuda
@pytest.mark.parametrize("bad_id", [4, 1000, -2])
def test_batched_adapter_id_out_of_range(bad_id):
    a = _bad_args()  # a pool of capacity 4: ids 0..3 are slots (3 is empty, so valid)
    a[1] = torch.tensor([0, bad_id, 1, 2], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=f"adapter_ids\\[1\\] = {bad_id} is out of range"):
        torch.ops.lori.batched_sparse_delta(*a)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.lori.batched_sparse_delta_backward(torch.ones(4, B_OUT, device="cuda"), *a,
                                                     True, True)
    a[1] = a[1].long()
    with pytest.raises(ValueError, match=f"adapter_ids\\[1\\] = {bad_id} is out of range"):
        torch.ops.lori.batched_sparse_delta(*a)


@needs_cuda
@pytest.mark.parametrize("mutate,exc,msg", [
    (mutate_arg(1, lambda t: t.float()), TypeError, "adapter_ids must be int32 or int64"),
    (mutate_arg(1, lambda t: t[:-1]), ValueError, "adapter_ids must have shape"),
    (mutate_arg(2, lambda t: t[:, :, :0]), ValueError, "masks must have shape"),
    (mutate_arg(3, lambda t: t.double()), TypeError, "values dtype"),
    (mutate_arg(4, lambda t: t[:-1]), ValueError, "value_starts must have shape"),
    (mutate_arg(5, lambda t: t[:, :-1]), ValueError, "offsets must have shape"),
    (mutate_arg(7, lambda t: t.double()), TypeError, "scales must be"),
    (mutate_arg(8, lambda t: t + 5), ValueError, "distributions\\[0\\] = 6"),
    (mutate_arg(9, lambda r: 64), ValueError, "masks must have shape"),
    (mutate_arg(4, lambda t: t + 10**6), ValueError, "do not lie within the values buffer"),
    (mutate_arg(4, lambda t: t - 1), ValueError, "do not lie within the values buffer"),
    (mutate_arg(5, lambda t: t + 1), ValueError, "offsets\\[0, 0\\] must be 0"),
    (mutate_arg(2, lambda t: t.cpu()), RuntimeError, "masks is on cpu but x is on cuda"),
    (mutate_arg(1, lambda t: t.cpu()), RuntimeError, "adapter_ids is on cpu but x is on cuda"),
])
def test_batched_bad_arguments_raise_clear_errors(mutate, exc, msg):
    a = _bad_args()
    mutate(a)
    with pytest.raises(exc, match=msg):
        torch.ops.lori.batched_sparse_delta(*a)


@needs_cuda
def test_batched_unvalidated_input_never_reads_out_of_bounds(monkeypatch):
    """With validation off, bad ids act as -1 and corrupt extents/offsets/masks are clamped: wrong
    numbers at worst, never an illegal access (which would surface at the synchronize)."""
    L.set_validation("off")
    pool = _bpools(3, seed=16)[1]
    masks, values, starts, offsets, seeds, scales, dists, rank = pool.op_args()
    x = torch.randn(33, B_IN, device="cuda")
    gy = torch.randn(33, B_OUT, device="cuda")
    ids = torch.tensor([0, 1, 2, 3, -5, 2**31 - 1, -2**31] * 4 + [1] * 5, dtype=torch.int32,
                       device="cuda")
    y = torch.ops.lori.batched_sparse_delta(x, ids, masks, values, starts, offsets, seeds, scales,
                                            dists, rank)
    bad = (ids < 0) | (ids >= 3)
    assert torch.count_nonzero(y[bad]) == 0
    gx, _ = torch.ops.lori.batched_sparse_delta_backward(gy, x, ids, masks, values, starts,
                                                         offsets, seeds, scales, dists, rank,
                                                         True, True)
    assert torch.count_nonzero(gx[bad]) == 0
    corrupt = [
        (masks, values, starts + 10**9, offsets, dists),
        (masks, values, starts - 10**9, offsets, dists),
        (masks, values, starts, offsets * 1000, dists),
        (masks, values, starts, -offsets.abs() - 5, dists),
        (masks, values, starts, torch.full_like(offsets, 2**31 - 1), dists),
        (torch.full_like(masks, -1), values, starts, offsets, dists),
        (masks, values[:0], starts, offsets, dists),
        (masks, values, starts, offsets, dists + 7),
    ]
    for m, v, s, o, d in corrupt:
        torch.ops.lori.batched_sparse_delta(x, ids, m, v, s, o, seeds, scales, d, rank)
        torch.ops.lori.batched_sparse_delta(x, ids, m, v, s, o, seeds, scales, d, rank,
                                            torch.zeros(33, B_OUT, device="cuda"))
        torch.ops.lori.batched_sparse_delta_backward(gy, x, ids, m, v, s, o, seeds, scales, d,
                                                     rank, True, True)
    torch.cuda.synchronize()

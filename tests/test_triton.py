"""The Triton backend (torch.ops.lori.triton_*) against the C++ kernels and the reference.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1,
set here before triton is imported unless the environment or tests/conftest.py already did).
Shapes are small so the whole file stays well under a few minutes in the interpreter.
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import lori_kernels as L  # noqa: E402
import lori_kernels.triton as LT  # noqa: E402
from lori_kernels import reference, spec  # noqa: E402
from lori_kernels.testing import (  # noqa: E402
    assert_within_rule, bad_delta_arguments, baseline_grads, check_compile_fullgraph,
    dense_lora_baseline, random_packed, reference_grads)

if LT.import_error is not None and not isinstance(LT.import_error, ImportError):
    raise LT.import_error  # a bug in the backend, not a missing dependency
if not LT.available():
    pytest.skip("Triton kernels cannot run here (no CUDA and not built for TRITON_INTERPRET=1)",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lori_kernels.triton.common import key_args, key_u32, philox4x32_10  # noqa: E402
from lori_kernels.triton.sparse_delta_fwd import Config, force_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DISTS = ["rademacher", "uniform"]
_ops = torch.ops.lori


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _dev(b):
    return b.to(DEVICE) if DEVICE != "cpu" else b


def _delta(x, b, seed, dist, scale, values=None):
    b = _dev(b)
    v = b.values if values is None else values
    return _ops.triton_sparse_delta(x.to(DEVICE), b.mask, v, b.offsets, b.rank,
                                    spec.check_seed(seed), dist, scale)


def _check_forward(x, b, seed, dist, scale, what=""):
    """x on the CPU or already on DEVICE (keeping its strides); references run on the CPU."""
    y = _delta(x, b, seed, dist, scale)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], b.out_features), what
    xc = x.cpu()
    ref = reference.sparse_delta(xc, b.to_dense(), seed, dist, scale)
    assert_within_rule(y.cpu(), ref, dense_lora_baseline(xc, b, seed, dist, scale), what)
    return y


# ---- A: bit-identical to the C++ kernel and the reference --------------------------------------

def _fill(rank, in_features, c0, c1, seed, dist, dtype=torch.float32):
    out = torch.full((rank, c1 - c0), float("nan"), dtype=dtype, device=DEVICE)
    _ops.triton_random_a_fill(out, spec.check_seed(seed), in_features, c0, dist)
    return out.cpu()


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("shape", [(1, 1, 0, 1), (5, 300, 0, 300), (33, 131, 7, 130),
                                   (17, 700, 129, 611), (3, 257, 256, 257), (2, 50, 20, 20)])
def test_random_a_bit_identical(dist, shape):
    rank, inp, c0, c1 = shape
    for seed in (0, 2**63 + 12345, 2**64 - 1):
        a = _fill(rank, inp, c0, c1, seed, dist)
        cpp = _ops.random_a(spec.check_seed(seed), rank, inp, dist, c0, c1)
        assert torch.equal(a, cpp), (dist, shape, seed)
        assert torch.equal(a, reference.random_a(seed, rank, inp, dist, col_start=c0, col_end=c1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("dist", DISTS)
def test_random_a_dtypes_round_like_cpp(dtype, dist):
    # bf16 rounding is done with integer bit tricks (the interpreter's cast truncates).
    a = _fill(19, 333, 5, 300, 77, dist, dtype)
    assert torch.equal(a, _ops.random_a(77, 19, 333, dist, 5, 300, dtype=dtype))


def test_random_a_fill_noncontiguous_out():
    big = torch.zeros(40, 30, device=DEVICE)
    out = big.t()[:, 3:23]  # (30, 20) view with strides (1, 30)
    _ops.triton_random_a_fill(out, 9, 100, 40, "uniform")
    assert torch.equal(out.cpu(), _ops.random_a(9, 30, 100, "uniform", 40, 60))
    assert torch.count_nonzero(big[:3]) == 0 and torch.count_nonzero(big[23:]) == 0


@triton.jit
def _kat_kernel(c_ptr, o_ptr, k0, k1):
    one = tl.arange(0, 1)
    c0 = tl.load(c_ptr + one).to(tl.uint32, bitcast=True)
    c1 = tl.load(c_ptr + 1 + one).to(tl.uint32, bitcast=True)
    c2 = tl.load(c_ptr + 2 + one).to(tl.uint32, bitcast=True)
    c3 = tl.load(c_ptr + 3 + one).to(tl.uint32, bitcast=True)
    o0, o1, o2, o3 = philox4x32_10(c0, c1, c2, c3, key_u32(k0), key_u32(k1))
    tl.store(o_ptr + one, o0.to(tl.int32, bitcast=True))
    tl.store(o_ptr + 1 + one, o1.to(tl.int32, bitcast=True))
    tl.store(o_ptr + 2 + one, o2.to(tl.int32, bitcast=True))
    tl.store(o_ptr + 3 + one, o3.to(tl.int32, bitcast=True))


def test_philox_known_answers():
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF),
              (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, want in cases:
        c = torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in counter],
                         dtype=torch.int32, device=DEVICE)
        o = torch.empty(4, dtype=torch.int32, device=DEVICE)
        _kat_kernel[(1,)](c, o, *key_args(key[0] | key[1] << 32))
        assert [v & 0xFFFFFFFF for v in o.tolist()] == list(want)


# ---- forward -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("T", [0, 1, 7, 33])
def test_forward_tokens(dtype, dist, T):
    g = _gen(T)
    x = torch.randn(T, 131, generator=g).to(dtype)
    b = random_packed(70, 33, density=0.3, generator=g, dtype=dtype)
    _check_forward(x, b, 1234, dist, 2.0, f"T={T} {dtype} {dist}")


@pytest.mark.parametrize("rank", [1, 32, 70])
def test_forward_ranks(rank):
    g = _gen(rank)
    x = torch.randn(9, 77, generator=g)
    b = random_packed(65, rank, density=0.3, generator=g)
    _check_forward(x, b, rank, "rademacher", 0.5, f"rank={rank}")


@pytest.mark.parametrize("mask", ["zeros", "ones"])
def test_forward_all_zero_and_all_one_masks(mask):
    g = _gen(5)
    x = torch.randn(7, 200, generator=g)
    b = random_packed(70, 40, generator=g, mask=mask)
    y = _check_forward(x, b, 9, "uniform", 1.0)
    if mask == "zeros":
        assert torch.count_nonzero(y) == 0


def test_forward_noncontiguous_and_3d():
    g = _gen(4)
    big = torch.randn(2, 5, 2 * 150, generator=g).to(DEVICE)
    x = big[..., ::2]  # non-contiguous, 3-D
    assert not x.is_contiguous()
    b = random_packed(90, 24, generator=g)
    y = _check_forward(x, b, 3, "rademacher", 1.5)
    y2 = _delta(x.contiguous().reshape(-1, 150), b, 3, "rademacher", 1.5)
    assert torch.equal(y.reshape(-1, 90), y2)
    xt = torch.randn(150, 6, generator=g).to(DEVICE).t()  # transposed view
    _check_forward(xt, b, 3, "uniform", 1.0)
    _check_forward(torch.randn(150, generator=g), b, 3, "uniform", 1.0)  # 1-D x


def test_deterministic_with_split_reductions():
    # Split reductions write partials that are summed in a fixed order: no atomics.
    g = _gen(11)
    x = torch.randn(20, 300, generator=g).to(DEVICE).requires_grad_()
    b = _dev(random_packed(130, 40, density=0.4, generator=g))
    v = b.values.clone().requires_grad_()
    gy = torch.randn(20, 130, generator=g).to(DEVICE)
    runs = []
    with force_config(Config(block_k=128, block_t=16, split=3)):
        for _ in range(2):
            y = _ops.triton_sparse_delta(x, b.mask, v, b.offsets, 40, 5, "uniform", 0.7)
            runs.append((y, *torch.autograd.grad(y, (x, v), gy)))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("cfg", [Config(block_o=16, block_r=16, block_k=128, split=2),
                                 Config(block_o=32, block_t=16, split=3)],
                         ids=["o16-split2", "o32-split3"])
def test_forward_split_and_small_tiles(cfg):
    # split-K (fp32 atomics into h) and output blocks smaller than the 64-row chunk.
    g = _gen(6)
    x = torch.randn(20, 300, generator=g)
    b = random_packed(130, 40, density=0.4, generator=g)
    with force_config(cfg):
        _check_forward(x, b, 5, "uniform", 0.7, str(cfg))


def test_forward_float64_matches_reference():
    g = _gen(0)
    x = torch.randn(6, 50, generator=g, dtype=torch.float64)
    b = random_packed(20, 9, generator=g, dtype=torch.float64)
    y = _delta(x, b, 3, "rademacher", 0.3)
    ref = reference.sparse_delta(x, b.to_dense(), 3, "rademacher", 0.3)
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dist", DISTS)
def test_forward_close_to_cpp(dist):
    g = _gen(8)
    x = torch.randn(10, 160, generator=g)
    b = random_packed(100, 48, density=0.3, generator=g)
    y = _delta(x, b, 2**63 + 5, dist, 1.25).cpu()
    c = _ops.sparse_delta(x, b.mask, b.values, b.offsets, 48, spec.check_seed(2**63 + 5), dist,
                          1.25)
    torch.testing.assert_close(y, c, rtol=1e-5, atol=1e-5)


# ---- backward ----------------------------------------------------------------------------------

def _check_backward(x, b, seed, dist, scale, what=""):
    g = _gen(x.shape[0])
    xd = x.to(DEVICE).requires_grad_()
    values = _dev(b).values.clone().requires_grad_()
    y = _delta(xd, b, seed, dist, scale, values=values)
    gy = torch.randn(y.shape, generator=g).to(x.dtype)
    y.backward(gy.to(DEVICE))
    rgx, rgv = reference_grads(x, b, seed, dist, scale, gy)
    bgx, bgv = baseline_grads(x, b, seed, dist, scale, gy)
    assert xd.grad.dtype == x.dtype and values.grad.dtype == b.values.dtype
    assert_within_rule(xd.grad.cpu(), rgx, bgx, f"grad_x {what}")
    assert_within_rule(values.grad.cpu(), rgv, bgv, f"grad_values {what}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("T", [1, 33])
def test_backward_against_reference(dtype, dist, T):
    g = _gen(T + 100)
    x = torch.randn(T, 133, generator=g).to(dtype)
    b = random_packed(70, 33, density=0.3, generator=g, dtype=dtype)
    _check_backward(x, b, 77, dist, 2.0, f"T={T} {dtype} {dist}")


def test_backward_split_and_small_tiles():
    g = _gen(7)
    x = torch.randn(40, 130, generator=g)
    b = random_packed(130, 40, density=0.4, generator=g)
    with force_config(Config(block_o=16, block_t=16, block_k=128, split=2)):
        _check_backward(x, b, 3, "rademacher", 0.5, "split")


@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_backward_needs_input_grad(need):
    g = _gen(3)
    x = torch.randn(9, 64, generator=g).to(DEVICE).requires_grad_(need[0])
    b = _dev(random_packed(40, 8, generator=g))
    values = b.values.clone().requires_grad_(need[1])
    _ops.triton_sparse_delta(x, b.mask, values, b.offsets, 8, 1, "rademacher", 1.0).sum().backward()
    assert (x.grad is not None) == need[0]
    assert (values.grad is not None) == need[1]
    gx, gv = _ops.triton_sparse_delta_backward(
        torch.ones(9, 40, device=DEVICE), x.detach(), b.mask, b.values, b.offsets, 8, 1,
        "rademacher", 1.0, need[0], need[1])
    assert (gx.numel() > 0) == need[0] and (gv.numel() > 0) == need[1]


def test_backward_empty_batch():
    b = _dev(random_packed(40, 8, generator=_gen(0)))
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    values = b.values.clone().requires_grad_()
    _ops.triton_sparse_delta(x, b.mask, values, b.offsets, 8, 1, "uniform", 1.0).sum().backward()
    assert x.grad.shape == (0, 64)
    assert torch.count_nonzero(values.grad) == 0


def test_gradcheck_float64():
    g = _gen(0)
    x = torch.randn(2, 9, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    b = _dev(random_packed(6, 3, density=0.5, generator=g, dtype=torch.float64))
    v = b.values.clone().requires_grad_()
    torch.autograd.gradcheck(
        lambda x, v: _ops.triton_sparse_delta(x, b.mask, v, b.offsets, 3, 5, "uniform", 1.5),
        (x, v))


# ---- merge_delta_ ------------------------------------------------------------------------------

def _merge(w, b, seed, dist, scale):
    b = _dev(b)
    _ops.triton_merge_delta_(w, b.mask, b.values, b.offsets, b.rank, spec.check_seed(seed), dist,
                             scale)


def _merge_ref(w0, b, seed, dist, scale):
    """(float64 reference, plain torch in w0's dtype) of w0 + scale * B @ A."""
    a = reference.random_a(seed, b.rank, w0.shape[1], dist)
    ref = w0.double() + scale * b.to_dense().double() @ a.double()
    base = w0 + scale * b.to_dense().to(w0.dtype) @ a.to(w0.dtype)
    return ref, base


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("shape", [(77, 300, 20), (130, 129, 33), (1, 5, 1), (64, 257, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_merge_delta_against_reference_and_cpp(dtype, dist, shape):
    # out not a multiple of 64 (77, 130), rank 1 and 33 (two mask words), in not a multiple of
    # the column tile.
    out, inp, rank = shape
    g = _gen(out + rank)
    b = random_packed(out, rank, density=0.4, generator=g, dtype=dtype)
    w0 = torch.randn(out, inp, generator=g).to(dtype)
    w = w0.clone().to(DEVICE)  # on the CPU .to would alias w0
    _merge(w, b, 2**63 + 9, dist, 0.7)
    ref, base = _merge_ref(w0, b, 2**63 + 9, dist, 0.7)
    assert_within_rule(w.cpu(), ref, base, f"merge {dtype} {dist} {shape}")
    wc = w0.clone()
    L.merge_delta_(wc, b, seed=2**63 + 9, distribution=dist, scale=0.7, backend="cpp")
    assert_within_rule(w.cpu(), wc.double(), base, "vs C++")  # C++ is itself within the rule
    if dtype == torch.float64:
        torch.testing.assert_close(w.cpu(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(dtype):
    g = _gen(21)
    b = random_packed(90, 24, density=0.3, generator=g, dtype=dtype)
    w0 = torch.randn(90, 200, generator=g).to(dtype)
    w = w0.clone().to(DEVICE)  # on the CPU .to would alias w0
    L.merge_delta_(w, _dev(b), seed=5, distribution="uniform", scale=1.5, backend="triton")
    assert not torch.equal(w.cpu(), w0)
    L.merge_delta_(w, _dev(b), seed=5, distribution="uniform", scale=-1.5, backend="triton")
    # Each pass rounds once into the weight: back to w0 within the rule for two roundings.
    ref, base = _merge_ref(w0, b, 5, "uniform", 1.5)
    _, base2 = _merge_ref(base, b, 5, "uniform", -1.5)
    assert_within_rule(w.cpu(), w0.double(), base2, "unmerge")


def test_merge_noncontiguous_weight_and_env_backend(monkeypatch):
    g = _gen(22)
    b = random_packed(70, 16, generator=g)
    w0 = torch.randn(70, 150, generator=g)
    w = w0.clone().to(DEVICE)  # on the CPU .to would alias w0
    _merge(w, b, 3, "rademacher", 2.0)
    wt = w0.t().contiguous().t().to(DEVICE)  # column-major weight (a copy)
    assert not wt.is_contiguous()
    L.set_backend("triton")
    L.merge_delta_(wt, _dev(b), seed=3, scale=2.0)
    assert torch.equal(wt, w)
    big = torch.zeros(70, 300, device=DEVICE)   # a column slice: only it changes
    L.merge_delta_(big[:, 100:250], _dev(b), seed=3, scale=2.0)
    z = torch.zeros(70, 150, device=DEVICE)
    _merge(z, b, 3, "rademacher", 2.0)
    assert torch.count_nonzero(z) > 0 and torch.equal(big[:, 100:250], z)
    assert torch.count_nonzero(big[:, :100]) == 0 and torch.count_nonzero(big[:, 250:]) == 0


def _merge_args(dtype=torch.float32):
    g = _gen(9)
    b = _dev(random_packed(20, 8, generator=g, dtype=dtype))
    return [torch.randn(20, 40, generator=g).to(dtype).to(DEVICE), b.mask, b.values, b.offsets,
            8, 1, "rademacher", 1.0]


@pytest.mark.parametrize("mutate,exc,msg", [
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "weight must be 2-D"),
    (lambda a: a.__setitem__(0, a[0][:19]), ValueError, "weight has 19 rows"),
    (lambda a: a.__setitem__(0, a[0].to(torch.int32)), TypeError, "weight must be float"),
    (lambda a: a.__setitem__(0, a[0].double()), TypeError, "values dtype .* must match weight"),
    (lambda a: a.__setitem__(0, a[0][:, :0]), ValueError, "in_features"),
    (lambda a: a.__setitem__(1, a[1].to(torch.int64)), TypeError, "mask must be int32"),
    (lambda a: a.__setitem__(2, a[2][:-1]), ValueError, "values has|entries"),
    (lambda a: a.__setitem__(3, a[3][:-1]), ValueError, "offsets must have shape"),
    (lambda a: a.__setitem__(4, 0), ValueError, "rank must be in"),
    (lambda a: a.__setitem__(4, 40), ValueError, "mask must have shape"),
    (lambda a: a.__setitem__(6, "normal"), ValueError, "distribution"),
])
def test_merge_bad_arguments(mutate, exc, msg):
    a = _merge_args()
    mutate(a)
    w_before = a[0].clone() if a[0].is_floating_point() else None
    with pytest.raises(exc, match=msg):
        _ops.triton_merge_delta_(*a)
    if w_before is not None:
        assert torch.equal(a[0], w_before)  # nothing written before the error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_opcheck(dtype):
    torch.library.opcheck(_ops.triton_merge_delta_.default, _merge_args(dtype))


# ---- op machinery --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    g = _gen(1)
    b = _dev(random_packed(70, 33, generator=g, dtype=dtype))
    x = torch.randn(3, 45, generator=g).to(dtype).to(DEVICE)
    args = (x, b.mask, b.values, b.offsets, b.rank, 7, "uniform", 1.5)
    torch.library.opcheck(_ops.triton_sparse_delta.default, args)
    gy = torch.randn(3, 70, generator=g).to(dtype).to(DEVICE)
    torch.library.opcheck(_ops.triton_sparse_delta_backward.default, (gy, *args, True, True))
    xg = x.clone().requires_grad_()
    vg = b.values.clone().requires_grad_()
    torch.library.opcheck(_ops.triton_sparse_delta.default,
                          (xg, b.mask, vg, b.offsets, b.rank, 7, "rademacher", 1.0))


def test_opcheck_random_a_fill():
    torch.library.opcheck(_ops.triton_random_a_fill.default,
                          (torch.empty(5, 40, device=DEVICE), 3, 100, 30, "rademacher"))


def test_torch_compile_fullgraph():
    g = _gen(2)
    b = _dev(random_packed(64, 16, generator=g))

    def f(x, v):
        y = _ops.triton_sparse_delta(x, b.mask, v, b.offsets, 16, 11, "rademacher", 2.0)
        return torch.nn.functional.gelu(y).sum()

    check_compile_fullgraph(f, torch.randn(5, 48, generator=g).to(DEVICE), b.values.clone())


# ---- bad input ---------------------------------------------------------------------------------

def _args(T=3, inp=40, out=20, rank=8, dtype=torch.float32):
    g = _gen(9)
    b = _dev(random_packed(out, rank, generator=g, dtype=dtype))
    return [torch.randn(T, inp, generator=g).to(dtype).to(DEVICE), b.mask, b.values, b.offsets,
            rank, 1, "rademacher", 1.0]


@pytest.mark.parametrize("mutate,exc,msg", bad_delta_arguments(DEVICE))
def test_bad_arguments_raise_clear_errors(mutate, exc, msg):
    a = _args()
    mutate(a)
    with pytest.raises(exc, match=msg):
        _ops.triton_sparse_delta(*a)
    gy = torch.ones(3, 20, dtype=a[0].dtype if a[0].is_floating_point() else torch.float32,
                    device=DEVICE)
    with pytest.raises(exc, match=msg):
        _ops.triton_sparse_delta_backward(gy, *a, True, True)


@pytest.mark.skipif(DEVICE != "cpu", reason="contents are validated on the host for CPU tensors")
def test_inconsistent_bitmask_is_caught():
    a = _args(out=130, rank=40)
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
            _ops.triton_sparse_delta(a[0], m, v, o, *a[4:])


def test_grad_y_checked():
    a = _args()
    with pytest.raises(ValueError, match="grad_y must have shape"):
        _ops.triton_sparse_delta_backward(torch.ones(3, 21, device=DEVICE), *a, True, True)
    with pytest.raises(TypeError, match="grad_y dtype"):
        _ops.triton_sparse_delta_backward(torch.ones(3, 20, dtype=torch.float64, device=DEVICE),
                                          *a, True, True)


def test_random_a_fill_bad_arguments():
    with pytest.raises(ValueError, match="exceed in_features"):
        _ops.triton_random_a_fill(torch.empty(2, 10, device=DEVICE), 1, 15, 6, "uniform")
    with pytest.raises(ValueError, match="out must be 2-D"):
        _ops.triton_random_a_fill(torch.empty(10, device=DEVICE), 1, 15, 0, "uniform")
    with pytest.raises(TypeError, match="out must be float"):
        _ops.triton_random_a_fill(torch.empty(2, 3, dtype=torch.int32, device=DEVICE), 1, 15, 0,
                                  "uniform")
    with pytest.raises(ValueError, match="distribution"):
        _ops.triton_random_a_fill(torch.empty(2, 3, device=DEVICE), 1, 15, 0, "gauss")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter error")
def test_cpu_without_interpreter_raises_clear_error():
    code = ("import torch, lori_kernels.triton as lt\n"
            "assert not lt.available()\n"
            "try:\n"
            "    torch.ops.lori.triton_random_a_fill(torch.empty(2, 3), 1, 10, 0, 'uniform')\n"
            "except RuntimeError as e:\n"
            "    assert 'TRITON_INTERPRET=1' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('no error')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


# The sm_90 compile of every kernel (no GPU needed) is tests/test_triton_compile.py.


# ---- larger sweep ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("T,dtype,dist", [(130, torch.float32, "rademacher"),
                                          (130, torch.bfloat16, "uniform"),
                                          (17, torch.float16, "uniform"),
                                          (17, torch.bfloat16, "rademacher")])
def test_sweep_larger_shapes(T, dtype, dist):
    g = _gen(T)
    x = torch.randn(T, 520, generator=g).to(dtype)
    b = random_packed(200, 128, density=0.1, generator=g, dtype=dtype)
    _check_forward(x, b, 2**64 - 1, dist, 2.0, f"T={T}")
    _check_backward(x, b, 2**64 - 1, dist, 2.0, f"T={T}")

"""merge_delta_ (W += scale * B @ A in place; the negated scale unmerges) on every backend
against the float64 reference: the C++ kernels on the CPU, Triton (under the interpreter
without a GPU) and the C++ CUDA kernels (skipped without a GPU)."""
import pytest
import torch

import lori_kernels as L
from lori_kernels import reference, spec
from lori_kernels.testing import assert_within_rule, random_packed

from cuda_cases import DTYPES, SEED, _ref_a, _seed_arg, make_b, ops, tol_ok
from op_backends import backends, cases, pytest_id

DISTS = ["rademacher", "uniform"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _merge(backend, w, b, seed, dist, scale):
    """The backend's raw op on w (already on the device)."""
    b = backend.to(b)
    backend.merge_delta_(w, b.mask, b.values, b.offsets, b.rank, spec.check_seed(seed), dist,
                         scale)


def _merge_ref(w0, b, seed, dist, scale):
    """(float64 reference, plain torch in w0's dtype) of w0 + scale * B @ A."""
    a = reference.random_a(seed, b.rank, w0.shape[1], dist)
    ref = w0.double() + scale * b.to_dense().double() @ a.double()
    base = w0 + scale * b.to_dense().to(w0.dtype) @ a.to(w0.dtype)
    return ref, base


def _merge_args(backend, dtype=torch.float32):
    g = _gen(9)
    b = backend.to(random_packed(20, 8, generator=g, dtype=dtype))
    return [backend.to(torch.randn(20, 40, generator=g).to(dtype)), b.mask, b.values, b.offsets,
            8, 1, "rademacher", 1.0]


_MERGE_BAD = [
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
]
def _merge_bad_params():
    out = []
    for be in backends("cpu", "triton"):
        for mutate, exc, msg in _MERGE_BAD:
            out.append(pytest.param(mutate, exc, msg, be.values[0], marks=be.marks,
                                    id=f"{msg}-{be.values[0]}"))
    return out


@pytest.mark.parametrize("mutate,exc,msg,backend", _merge_bad_params())
def test_merge_bad_arguments(mutate, exc, msg, backend):
    a = _merge_args(backend)
    mutate(a)
    w_before = a[0].clone() if a[0].is_floating_point() else None
    with pytest.raises(exc, match=msg):
        backend.merge_delta_(*a)
    if w_before is not None:
        assert torch.equal(a[0], w_before)  # nothing written before the error


@pytest.mark.parametrize("backend,dtype", cases({
    "cpu": [torch.float32],
    "triton": [torch.float32, torch.bfloat16],
}), ids=pytest_id)
def test_merge_opcheck(backend, dtype):
    torch.library.opcheck(backend.op("merge_delta_").default, _merge_args(backend, dtype))


# ---- C++ CPU ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", backends("cpu"))
def test_merge_delta_matches_dense(backend, dtype):
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



# ---- Triton --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("shape", [(77, 300, 20), (130, 129, 33), (1, 5, 1), (64, 257, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", backends("triton"))
def test_merge_delta_against_reference_and_cpp(backend, dtype, dist, shape):
    # out not a multiple of 64 (77, 130), rank 1 and 33 (two mask words), in not a multiple of
    # the column tile.
    out, inp, rank = shape
    g = _gen(out + rank)
    b = random_packed(out, rank, density=0.4, generator=g, dtype=dtype)
    w0 = torch.randn(out, inp, generator=g).to(dtype)
    w = w0.clone().to(backend.device)  # on the CPU .to would alias w0
    _merge(backend, w, b, 2**63 + 9, dist, 0.7)
    ref, base = _merge_ref(w0, b, 2**63 + 9, dist, 0.7)
    assert_within_rule(w.cpu(), ref, base, f"merge {dtype} {dist} {shape}")
    wc = w0.clone()
    L.merge_delta_(wc, b, seed=2**63 + 9, distribution=dist, scale=0.7, backend="cpp")
    assert_within_rule(w.cpu(), wc.double(), base, "vs C++")  # C++ is itself within the rule
    if dtype == torch.float64:
        torch.testing.assert_close(w.cpu(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", backends("triton"))
def test_merge_unmerge_round_trip(backend, dtype):
    g = _gen(21)
    b = random_packed(90, 24, density=0.3, generator=g, dtype=dtype)
    w0 = torch.randn(90, 200, generator=g).to(dtype)
    w = w0.clone().to(backend.device)  # on the CPU .to would alias w0
    L.merge_delta_(w, backend.to(b), seed=5, distribution="uniform", scale=1.5,
                   backend=backend.route)
    assert not torch.equal(w.cpu(), w0)
    L.merge_delta_(w, backend.to(b), seed=5, distribution="uniform", scale=-1.5,
                   backend=backend.route)
    # Each pass rounds once into the weight: back to w0 within the rule for two roundings.
    ref, base = _merge_ref(w0, b, 5, "uniform", 1.5)
    _, base2 = _merge_ref(base, b, 5, "uniform", -1.5)
    assert_within_rule(w.cpu(), w0.double(), base2, "unmerge")


@pytest.mark.parametrize("backend", backends("triton"))
def test_merge_noncontiguous_weight_and_env_backend(backend, monkeypatch):
    g = _gen(22)
    b = random_packed(70, 16, generator=g)
    w0 = torch.randn(70, 150, generator=g)
    w = w0.clone().to(backend.device)  # on the CPU .to would alias w0
    _merge(backend, w, b, 3, "rademacher", 2.0)
    wt = w0.t().contiguous().t().to(backend.device)  # column-major weight (a copy)
    assert not wt.is_contiguous()
    L.set_backend("triton")
    L.merge_delta_(wt, backend.to(b), seed=3, scale=2.0)
    assert torch.equal(wt, w)
    big = torch.zeros(70, 300, device=backend.device)   # a column slice: only it changes
    L.merge_delta_(big[:, 100:250], backend.to(b), seed=3, scale=2.0)
    z = torch.zeros(70, 150, device=backend.device)
    _merge(backend, z, b, 3, "rademacher", 2.0)
    assert torch.count_nonzero(z) > 0 and torch.equal(big[:, 100:250], z)
    assert torch.count_nonzero(big[:, :100]) == 0 and torch.count_nonzero(big[:, 250:]) == 0



# ---- CUDA: benchmark-sized shapes, judged against plain torch on the GPU -------------------------------

@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(4096, 1024, 32), (129, 341, 7), (70, 65, 256)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", backends("cuda"))
def test_merge_delta(backend, dtype, shape):
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


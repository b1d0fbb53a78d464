"""A, the frozen random projection, regenerated from its seed: bit-identical on every backend
(the C++ kernels on the CPU, Triton under the interpreter without a GPU, the C++ CUDA kernels)
to the pure-PyTorch reference, whole or as a column slice, in every dtype; the fill op's
argument checks. Triton's own Philox kernel against the Random123 answers is in
tests/test_backend_triton.py."""
import pytest
import torch

import lori_kernels as L
from lori_kernels import reference, spec

from cuda_cases import SEED, _seed_arg, ops
from op_backends import backends, cases, pytest_id

DISTS = ["rademacher", "uniform"]
TRITON_SHAPES = [(1, 1, 0, 1), (5, 300, 0, 300), (33, 131, 7, 130), (17, 700, 129, 611),
                 (3, 257, 256, 257), (2, 50, 20, 20)]
CUDA_SHAPES = [(32, 4096, 0, 4096), (7, 341, 0, 341), (33, 1000, 5, 777), (1, 129, 128, 129),
               (256, 200, 64, 200)]
ROUNDED = (torch.float64, torch.bfloat16, torch.float16)


def _fill(backend, rank, in_features, c0, c1, seed, dist, dtype=torch.float32):
    """The backend's raw fill op into a NaN buffer (every element must be written)."""
    out = torch.full((rank, c1 - c0), float("nan"), dtype=dtype, device=backend.device)
    backend.random_a_fill(out, seed, in_features, c0, dist)
    return out.cpu()


# Rows: (shape = (rank, in, c0, c1), seeds, also the public wrapper and its rounded dtypes).
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("backend,shape,seeds,wrapper", cases({
    "cpu": [(s, (0, 2**63 + 12345, 2**64 - 1, SEED), True) for s in TRITON_SHAPES],
    "triton": [(s, (0, 2**63 + 12345, 2**64 - 1), False) for s in TRITON_SHAPES],
    "cuda": [(s, (SEED,), True) for s in CUDA_SHAPES],
}), ids=pytest_id)
def test_random_a_bit_identical(backend, shape, seeds, wrapper, dist):
    rank, inp, c0, c1 = shape
    for seed in seeds:
        ref = reference.random_a(seed, rank, inp, dist, col_start=c0, col_end=c1)
        a = _fill(backend, rank, inp, c0, c1, seed, dist)
        assert torch.equal(a, ref), (dist, shape, seed)
        assert torch.equal(a, ops.random_a(spec.check_seed(seed), rank, inp, dist, c0, c1))
        if not wrapper:
            continue
        cols = None if (c0, c1) == (0, inp) else (c0, c1)
        for dtype in (torch.float32, *ROUNDED):  # fp32 values rounded once to dtype
            got = L.random_a(seed, rank, inp, distribution=dist, columns=cols, dtype=dtype,
                             device=backend.device, backend=backend.route)
            assert got.device.type == backend.device and got.dtype == dtype
            assert torch.equal(got.cpu(), ref.to(dtype)), (dist, shape, seed, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=pytest_id)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("backend", backends("cpu", "triton", "cuda"))
def test_random_a_dtypes_round_like_cpp(backend, dist, dtype):
    # Triton's bf16 rounding is done with integer bit tricks (the interpreter's cast truncates).
    a = _fill(backend, 19, 333, 5, 300, 77, dist, dtype)
    assert torch.equal(a, ops.random_a(77, 19, 333, dist, 5, 300, dtype=dtype))


@pytest.mark.parametrize("backend", backends("cpu", "triton", "cuda"))
def test_random_a_fill_noncontiguous_out(backend):
    big = torch.zeros(40, 30, device=backend.device)
    out = big.t()[:, 3:23]  # (30, 20) view with strides (1, 30)
    backend.random_a_fill(out, 9, 100, 40, "uniform")
    assert torch.equal(out.cpu(), ops.random_a(9, 30, 100, "uniform", 40, 60))
    assert torch.count_nonzero(big[:3]) == 0 and torch.count_nonzero(big[23:]) == 0
    col = torch.empty(100, 16, device=backend.device).t()  # (16, 100), column-major
    backend.random_a_fill(col, SEED, 300, 50, "uniform")
    assert torch.equal(col.cpu(), reference.random_a(SEED, 16, 300, "uniform", col_start=50,
                                                     col_end=150))


@pytest.mark.parametrize("backend", backends("cpu", "triton"))
def test_opcheck_random_a_fill(backend):
    torch.library.opcheck(backend.op("_random_a_fill").default,
                          (torch.empty(5, 40, device=backend.device), 3, 100, 30, "rademacher"))


@pytest.mark.parametrize("backend", backends("cpu", "triton"))
def test_random_a_fill_bad_arguments(backend):
    fill, dev = backend.op("_random_a_fill"), backend.device
    with pytest.raises(ValueError, match="exceed in_features"):
        fill(torch.empty(2, 10, device=dev), 1, 15, 6, "uniform")
    with pytest.raises(ValueError, match="out must be 2-D"):
        fill(torch.empty(10, device=dev), 1, 15, 0, "uniform")
    with pytest.raises(ValueError, match="distribution"):
        fill(torch.empty(2, 3, device=dev), 1, 15, 0, "gauss")


@pytest.mark.parametrize("backend", backends("cpu", "triton"))
def test_random_a_fill_rejects_non_float_out(backend):
    out = torch.full((2, 3), 7, dtype=torch.int32, device=backend.device)
    with pytest.raises(TypeError, match="out must be float"):
        backend.op("_random_a_fill")(out, 1, 15, 0, "uniform")


# ---- Philox itself: the CUDA kernel against the C++ CPU one -------------------------------------

@pytest.mark.parametrize("backend", backends("cuda"))
def test_philox_matches_cpu(backend):
    g = torch.Generator().manual_seed(1)
    counters = torch.randint(-2**31, 2**31, (4099, 4), generator=g, dtype=torch.int64)
    counters = counters.to(torch.int32)
    for seed in (0, 1, SEED, 2**64 - 1):
        cpu = ops.philox4x32_10(counters, _seed_arg(seed))
        gpu = ops.philox4x32_10(counters.cuda(), _seed_arg(seed)).cpu()
        assert torch.equal(cpu, gpu)


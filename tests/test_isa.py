"""Every CPU vector path (AVX-512, AVX2, generic) on this machine, via lori::_set_cpu_isa."""
import contextlib

import pytest
import torch

import lori_kernels as L
from lori_kernels import reference
from lori_kernels.testing import assert_within_rule, dense_lora_baseline, random_packed

ISAS = ["avx512", "avx2", "generic"]


@contextlib.contextmanager
def isa(level):
    prev = torch.ops.lori._set_cpu_isa(level)
    try:
        yield prev
    finally:
        torch.ops.lori._set_cpu_isa("auto")


def test_set_cpu_isa_reports_and_rejects():
    with isa("generic"):
        assert torch.ops.lori._set_cpu_isa("generic") == "generic"
    with pytest.raises(ValueError, match="isa must be"):
        torch.ops.lori._set_cpu_isa("sse2")


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("dist", ["rademacher", "uniform"])
def test_random_a_bit_identical_on_every_path(level, dist):
    with isa(level):
        for rank, n, cols in [(1, 1, None), (17, 129, None), (33, 4231, (5, 3001)), (64, 4096, None)]:
            got = L.random_a(99, rank, n, distribution=dist, columns=cols)
            c0, c1 = cols or (0, n)
            assert torch.equal(got, reference.random_a(99, rank, n, dist, col_start=c0, col_end=c1))


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3, 4, 5, 16, 17, 300])
def test_forward_on_every_path(level, dtype, T):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, 333, generator=g).to(dtype)
    for rank in (7, 32, 40):
        b = random_packed(131, rank, generator=g, dtype=dtype)
        with isa(level):
            y = L.sparse_delta(x, b, seed=5, scale=1.5)
        ref = reference.sparse_delta(x, b.to_dense(), 5, "rademacher", 1.5)
        assert_within_rule(y, ref, dense_lora_baseline(x, b, 5, "rademacher", 1.5), f"{level} T={T}")


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("T, rank", [(20, 33), (2, 32)])  # (2, 32): the AVX-512 decode backward
def test_backward_on_every_path(level, T, rank):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, 200, generator=g, requires_grad=True)
    b = random_packed(70, rank, generator=g)
    v = b.values.clone().requires_grad_()
    with isa(level):
        L.sparse_delta(x, b.with_values(v), seed=2).backward(torch.ones(T, 70))
    x2 = x.detach().double().requires_grad_()
    v2 = v.detach().double().requires_grad_()
    dense = torch.zeros(70, rank, dtype=torch.float64).masked_scatter(b.bool_mask(), v2)
    reference.sparse_delta(x2, dense, 2, "rademacher", 1.0).backward(torch.ones(T, 70, dtype=torch.float64))
    torch.testing.assert_close(x.grad.double(), x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v.grad.double(), v2.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("level", ISAS)
def test_corrupt_mask_caught_on_every_path(level):
    b = random_packed(130, 40, generator=torch.Generator().manual_seed(1))
    bad = b.mask.clone()
    bad[3, 0] ^= 1 << 7
    with isa(level), pytest.raises(ValueError, match="offsets"):
        torch.ops.lori.sparse_delta(torch.randn(1, 64), bad, b.values, b.offsets, 40, 1, "rademacher", 1.0)

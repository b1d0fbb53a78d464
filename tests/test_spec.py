"""The A spec: Philox known answers, bit-identity of C++ vs the reference, seeds, statistics."""
import math

import pytest
import torch

import lori_kernels as L
from lori_kernels import reference, spec

# Random123's published known-answer vectors for philox4x32_10: counter, key, expected.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _i32(v):
    return v - (1 << 32) if v >= 1 << 31 else v


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_reference_known_answers(counter, key, expected):
    out = reference.philox4x32_10(torch.tensor(counter, dtype=torch.int64), *key)
    assert [int(v) for v in out] == list(expected)


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_cpp_header_known_answers(counter, key, expected):
    seed = spec.check_seed(key[0] | (key[1] << 32))
    c = torch.tensor([[_i32(v) for v in counter]], dtype=torch.int32)
    out = torch.ops.lori.philox4x32_10(c, seed)
    assert [v & 0xFFFFFFFF for v in out[0].tolist()] == list(expected)


def test_philox_cpp_matches_reference_on_many_counters():
    g = torch.Generator().manual_seed(0)
    c = torch.randint(-(1 << 31), 1 << 31, (1000, 4), dtype=torch.int64, generator=g)
    seed = 0xDEADBEEF12345678
    got = torch.ops.lori.philox4x32_10(c.to(torch.int32), spec.check_seed(seed)).to(torch.int64)
    want = reference.philox4x32_10(c & 0xFFFFFFFF, seed & 0xFFFFFFFF, seed >> 32)
    assert torch.equal(got & 0xFFFFFFFF, want)


SEEDS = [0, 1, 42, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15]


@pytest.mark.parametrize("distribution", ["rademacher", "uniform"])
@pytest.mark.parametrize("seed", SEEDS)
def test_random_a_bit_identical_to_reference(distribution, seed):
    for rank, n in [(1, 1), (3, 7), (8, 128), (17, 129), (32, 341), (5, 1031)]:
        got = L.random_a(seed, rank, n, distribution=distribution)
        want = reference.random_a(seed, rank, n, distribution)
        assert torch.equal(got, want), (rank, n)


@pytest.mark.parametrize("distribution", ["rademacher", "uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_random_a_dtypes_round_once(distribution, dtype):
    got = L.random_a(7, 33, 4231, distribution=distribution, dtype=dtype)
    assert got.dtype == dtype
    assert torch.equal(got, reference.random_a(7, 33, 4231, distribution).to(dtype))


@pytest.mark.parametrize("distribution", ["rademacher", "uniform"])
@pytest.mark.parametrize("cols", [(0, 1), (5, 133), (127, 129), (128, 256), (300, 4231)])
def test_random_a_column_slices_are_sub_blocks(distribution, cols):
    full = L.random_a(99, 9, 4231, distribution=distribution)
    part = L.random_a(99, 9, 4231, distribution=distribution, columns=cols)
    assert torch.equal(part, full[:, cols[0]:cols[1]])


def test_random_a_large_matches_reference():
    # Exercises the vectorized Philox across many blocks and rows (in=4096, rank 64).
    for d in ("rademacher", "uniform"):
        assert torch.equal(L.random_a(5, 64, 4096, distribution=d), reference.random_a(5, 64, 4096, d))


def test_distributions_statistics():
    n = 4096
    for d in ("rademacher", "uniform"):
        a = L.random_a(3, 64, n, distribution=d, dtype=torch.float64)
        assert abs(a.mean().item()) < 5 / math.sqrt(a.numel()) / math.sqrt(3 * n) * 3
        assert a.var().item() == pytest.approx(1 / (3 * n), rel=0.02)
    u = L.random_a(3, 64, n, distribution="uniform")
    assert u.abs().max().item() < 1 / math.sqrt(n)
    r = L.random_a(3, 64, n, distribution="rademacher")
    assert set(r.abs().unique().tolist()) == {spec.magnitude("rademacher", n)}


def test_distinct_seeds_and_rows_are_independent():
    a = L.random_a(1, 4, 512)
    b = L.random_a(2, 4, 512)
    assert not torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    # The two distributions use different counter streams (dist id in counter word 2).
    u = L.random_a(1, 4, 512, distribution="uniform")
    assert not torch.equal(a.sign(), u.sign())


def test_magnitude_is_fp32_of_float64():
    assert spec.magnitude("uniform", 4096) == 1 / 64
    import numpy as np
    assert spec.magnitude("rademacher", 3) == float(np.float32(1 / 3))
    assert spec.magnitude("uniform", 14336) == float(np.float32(1 / math.sqrt(14336)))


def test_layer_seed_is_pinned():
    # Pinned values: a change here silently changes every stored adapter's A.
    assert L.layer_seed(0, "") == int.from_bytes(
        __import__("hashlib").sha256(b"lori-layer-seed\x00" + bytes(8)).digest()[:8], "little")
    s = L.layer_seed(1234, "model.layers.0.self_attn.q_proj")
    assert s == L.layer_seed(1234, "model.layers.0.self_attn.q_proj")
    assert s != L.layer_seed(1234, "model.layers.0.self_attn.k_proj")
    assert s != L.layer_seed(1235, "model.layers.0.self_attn.q_proj")
    assert 0 <= s < 2**64


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, "3", True, None])
def test_seed_out_of_range_is_rejected(bad):
    with pytest.raises((ValueError, TypeError), match="seed"):
        L.random_a(bad, 4, 8)


def test_random_a_bad_arguments():
    with pytest.raises(ValueError, match="distribution"):
        L.random_a(0, 4, 8, distribution="gaussian")
    with pytest.raises(ValueError, match="in_features"):
        L.random_a(0, 4, 0)
    with pytest.raises(ValueError, match="columns"):
        L.random_a(0, 4, 8, columns=(3, 9))
    with pytest.raises(ValueError, match="distribution"):
        torch.ops.lori.random_a(0, 4, 8, "gaussian")
    with pytest.raises(ValueError, match="columns"):
        torch.ops.lori.random_a(0, 4, 8, "uniform", 5, 3)


def test_random_a_opcheck():
    out = torch.empty(5, 77)
    torch.library.opcheck(torch.ops.lori._random_a_fill.default, (out, 3, 300, 11, "uniform"))
    torch.library.opcheck(torch.ops.lori.random_a.default, (3, 5, 300, "rademacher", 0, -1))
    torch.library.opcheck(torch.ops.lori.philox4x32_10.default,
                          (torch.zeros(3, 4, dtype=torch.int32), 5))


def test_random_a_fill_rejects_overflowing_columns():
    out = torch.full((1, 2), 7.0)
    with pytest.raises(ValueError, match="exceed in_features"):
        torch.ops.lori._random_a_fill(out, 1, 10, 2**63 - 1, "rademacher")
    with pytest.raises(ValueError, match="col_end"):
        torch.ops.lori.random_a(1, 2, 10, "rademacher", 0, -5)

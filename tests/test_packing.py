"""The B spec: bitmask packing, the mask-defines-pattern rule, validation of corrupt input."""
import pytest
import torch

import lori_kernels as L
from lori_kernels import packing, spec
from lori_kernels.testing import random_packed


@pytest.mark.parametrize("rank", [1, 7, 31, 32, 33, 64, 100, 128, 256])
@pytest.mark.parametrize("out", [1, 63, 64, 65, 341])
def test_roundtrip(rank, out):
    g = torch.Generator().manual_seed(rank * 1000 + out)
    b = torch.randn(out, rank, generator=g) * (torch.rand(out, rank, generator=g) < 0.3)
    p = L.pack_bitmask(b)
    assert p.mask.shape == (out, spec.mask_words(rank)) and p.mask.dtype == torch.int32
    assert p.offsets.shape == (spec.num_chunks(out) + 1,)
    assert torch.equal(L.unpack_bitmask(p), b)
    assert torch.equal(p.bool_mask(), b != 0)
    p.validate()


def test_byte_layout_is_lsb_first_words():
    m = torch.zeros(2, 40, dtype=torch.bool)
    m[0, 0] = m[0, 31] = m[0, 32] = True
    m[1, 39] = True
    p = L.pack_bitmask(torch.ones(2, 40), mask=m)
    words = p.mask.view(torch.int32).tolist()
    assert [w & 0xFFFFFFFF for w in words[0]] == [0x80000001, 0x1]
    assert [w & 0xFFFFFFFF for w in words[1]] == [0x0, 0x80]
    assert p.offsets.tolist() == [0, 4]
    assert p.values.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_zero_value_on_mask_stays_in_pattern():
    b = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    m = torch.tensor([[True, True], [False, True]])
    p = L.pack_bitmask(b, mask=m)
    assert p.nnz == 3 and p.values.tolist() == [0.0, 2.0, 0.0]
    assert torch.equal(p.bool_mask(), m)


def test_chunk_offsets():
    out, rank = 200, 16
    m = torch.zeros(out, rank, dtype=torch.bool)
    m[:, 0] = True        # one per row
    m[64:128, 1] = True   # chunk 1 has two per row
    p = L.pack_bitmask(torch.ones(out, rank), mask=m)
    assert p.offsets.tolist() == [0, 64, 192, 256, 264]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nbytes_at_90_percent_is_under_a_tenth_of_dense_bf16_lora(dtype):
    out = inp = 4096
    rank = 32
    p = random_packed(out, rank, density=0.1, dtype=dtype, generator=torch.Generator().manual_seed(0))
    dense_bf16 = (rank * inp + out * rank) * 2
    if dtype != torch.float32:
        assert p.nbytes <= dense_bf16 / 10, (p.nbytes, dense_bf16)


def _corrupt_cases(p):
    m2 = p.mask.clone(); m2[0, 0] ^= 1 << 3
    yield "offsets do not match", (m2, p.values, p.offsets)
    yield "entries but values", (p.mask, p.values[:-1], p.offsets)
    o2 = p.offsets.clone(); o2[1] += 1
    yield "offsets do not match", (p.mask, p.values, o2)
    m3 = p.mask.clone(); m3[0, -1] |= 1 << 30   # rank 33: bit 62 is past the rank
    yield "positions >= rank", (m3, p.values, p.offsets)
    yield "mask must be int32", (p.mask.to(torch.int64), p.values, p.offsets)
    yield "offsets must be int32", (p.mask, p.values, p.offsets[:-1])


def test_validate_rejects_corruption():
    p = random_packed(130, 33, generator=torch.Generator().manual_seed(1))
    for msg, (m, v, o) in _corrupt_cases(p):
        with pytest.raises(ValueError, match=msg):
            packing.validate_packed(m, v, o, 33)


def test_pack_bad_input():
    with pytest.raises(ValueError, match="rank"):
        L.pack_bitmask(torch.ones(4, 257))
    with pytest.raises(ValueError, match="2-D"):
        L.pack_bitmask(torch.ones(4))
    with pytest.raises(TypeError, match="bool"):
        L.pack_bitmask(torch.ones(4, 4), mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="shape"):
        L.pack_bitmask(torch.ones(4, 4), mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype"):
        L.pack_bitmask(torch.ones(4, 4, dtype=torch.int32))

"""Triton kernels on packed B whose offsets disagree with the mask (what an unvalidated CUDA
call can hand them): every read and write of `values` stays inside the chunk's
[offsets[c], offsets[c+1]) (docs/spec_b.md), and gradient slots no entry maps to are 0.

The kernel entry points are called directly, below the op's host-side validation (which
rejects such offsets for CPU tensors). The expected results decode B with the same bound rule
in plain PyTorch, so a kernel that reads another chunk's values, or leaves uninitialised
memory in grad_values, fails here.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import lori_kernels.triton as LT  # noqa: E402

if LT.import_error is not None and not isinstance(LT.import_error, ImportError):
    raise LT.import_error
if not LT.available():
    pytest.skip("Triton kernels cannot run here", allow_module_level=True)

from lori_kernels import reference, spec  # noqa: E402
from lori_kernels.packing import unpack_mask  # noqa: E402
from lori_kernels.testing import random_packed  # noqa: E402
from lori_kernels.triton import batched_delta as BD  # noqa: E402
from lori_kernels.triton import merge_delta as M  # noqa: E402
from lori_kernels.triton import sparse_delta_bwd as B  # noqa: E402
from lori_kernels.triton import sparse_delta_fwd as F  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERP = LT.interpreted()
OUT, RANK, IN = 150, 40, 70   # 3 chunks, 2 mask words
SEED, DIST, SCALE = 99, "rademacher", 1.5


def bounded_slots(mask, offsets, rank, nnz):
    """(slot, valid) per (o, k): the values index each mask entry decodes to and whether it
    lies inside its chunk's [offsets[c], offsets[c+1]) clamped to [0, nnz)."""
    bits = unpack_mask(mask.cpu(), rank)
    out = bits.shape[0]
    off = offsets.cpu().long()
    slot = torch.full((out, rank), -1, dtype=torch.long)
    valid = torch.zeros((out, rank), dtype=torch.bool)
    for c in range((out + 63) // 64):
        lo = min(max(int(off[c]), 0), nnz)
        hi = min(max(int(off[c + 1]), lo), nnz)
        pos = int(off[c])
        for o in range(64 * c, min(64 * c + 64, out)):
            for k in range(rank):
                if bits[o, k]:
                    slot[o, k] = pos
                    valid[o, k] = lo <= pos < hi
                    pos += 1
    return slot, valid


def bounded_dense(mask, values, offsets, rank):
    slot, valid = bounded_slots(mask, offsets, rank, values.numel())
    v = values.cpu().double()
    return torch.where(valid, v[slot.clamp(0, max(v.numel() - 1, 0))],
                       torch.zeros((), dtype=torch.float64))


def corrupt_cases():
    g = torch.Generator().manual_seed(5)
    b = random_packed(OUT, RANK, density=0.3, dtype=torch.float64, generator=g)
    off = b.offsets.clone()
    cases = {}
    o = off.clone(); o[1] -= 3; cases["chunk0_overruns"] = o           # noqa: E702
    o = off.clone(); o[1] += 5; cases["chunk1_overruns_gap"] = o       # noqa: E702
    o = off.clone(); o[2] = o[3] + 7; cases["last_chunk_past_nnz"] = o  # noqa: E702
    o = off.clone(); o[0] = -4; cases["negative_start"] = o            # noqa: E702
    return b, cases


B0, CASES = corrupt_cases()


def _dev(t):
    return t.to(DEVICE)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_reads_stay_in_chunk(case):
    off = CASES[case]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, IN, generator=g, dtype=torch.float64)
    y = F.sparse_delta_fwd(_dev(x), _dev(B0.mask), _dev(B0.values), _dev(off), RANK, SEED, DIST,
                           SCALE, INTERP)
    want = reference.sparse_delta(x, bounded_dense(B0.mask, B0.values, off, RANK), SEED, DIST,
                                  SCALE)
    # The unbounded decode differs (a case that changed nothing would not test the bound).
    assert not torch.allclose(want, reference.sparse_delta(
        x, bounded_dense(B0.mask, B0.values, B0.offsets, RANK), SEED, DIST, SCALE))
    torch.testing.assert_close(y.cpu(), want, rtol=1e-12, atol=1e-12)


class _NanEmpty:
    """Stands for the torch module inside sparse_delta_bwd: torch.empty returns NaN-filled
    float buffers, so any slot a kernel leaves unwritten shows up."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_bounded_and_unwritten_slots_zero(case, split, monkeypatch):
    monkeypatch.setattr(B, "torch", _NanEmpty())
    off = CASES[case]
    g = torch.Generator().manual_seed(2)
    # 70 tokens: two token tiles even under the interpreter's 64-token blocks, so split=2
    # splits grad_values' reduction too.
    x = torch.randn(70, IN, generator=g, dtype=torch.float64)
    gy = torch.randn(70, OUT, generator=g, dtype=torch.float64)
    with F.force_config(F.Config(split=split)):
        gx, gv = B.sparse_delta_bwd(_dev(gy), _dev(x), _dev(B0.mask), _dev(B0.values), _dev(off),
                                    RANK, SEED, DIST, SCALE, True, True, INTERP)
    a = reference.random_a(SEED, RANK, IN, DIST).double()
    bd = bounded_dense(B0.mask, B0.values, off, RANK)
    torch.testing.assert_close(gx.cpu(), SCALE * (gy @ bd) @ a, rtol=1e-12, atol=1e-12)
    slot, valid = bounded_slots(B0.mask, off, RANK, B0.values.numel())
    full = SCALE * gy.T @ (x @ a.T)                      # (out, rank) gradient of dense B
    want = torch.zeros(B0.values.numel(), dtype=torch.float64)
    want[slot[valid]] = full[valid]
    assert (~torch.isin(torch.arange(want.numel()), slot[valid])).any(), "no unmapped slot"
    torch.testing.assert_close(gv.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_reads_stay_in_chunk(case):
    off = CASES[case]
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    w = _dev(w0.clone())
    M.merge_delta_(w, _dev(B0.mask), _dev(B0.values), _dev(off), RANK, SEED, DIST, SCALE, INTERP)
    a = reference.random_a(SEED, RANK, IN, DIST).double()
    want = w0 + SCALE * bounded_dense(B0.mask, B0.values, off, RANK) @ a
    torch.testing.assert_close(w.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_forward_reads_stay_in_chunk(case):
    # Two adapters with the same mask: slot 0 with sound offsets, slot 1 with corrupt ones,
    # its values right after slot 0's in one buffer.
    off = CASES[case]
    nnz = B0.values.numel()
    masks = torch.stack([B0.mask, B0.mask])
    values = torch.cat([B0.values, B0.values * -2])
    offsets = torch.stack([B0.offsets, off]).to(torch.int32)
    vstarts = torch.tensor([0, nnz], dtype=torch.int64)
    seeds = torch.tensor([spec.check_seed(SEED), spec.check_seed(SEED + 1)], dtype=torch.int64)
    scales = torch.tensor([SCALE, 0.5], dtype=torch.float32)
    dists = torch.tensor([spec.DISTRIBUTIONS[DIST]] * 2, dtype=torch.int32)
    ids = torch.tensor([1, 0, 1, -1, 1, 0], dtype=torch.int32)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, IN, generator=g, dtype=torch.float64)
    y = BD.batched_fwd(*map(_dev, (x, ids, masks, values, vstarts, offsets, seeds, scales,
                                   dists)), RANK, None, INTERP)
    # Slot 1 reads only values[nnz:] (its extent), bounded per chunk by its own offsets.
    extent = values[nnz:]
    b1 = bounded_dense(B0.mask, extent, off, RANK)
    b0 = bounded_dense(B0.mask, B0.values, B0.offsets, RANK)
    want = torch.zeros(6, OUT, dtype=torch.float64)
    for t, a in enumerate(ids.tolist()):
        if a == 0:
            want[t] = reference.sparse_delta(x[t:t + 1], b0, SEED, DIST, SCALE)[0]
        elif a == 1:
            want[t] = reference.sparse_delta(x[t:t + 1], b1, SEED + 1, DIST, 0.5)[0]
    torch.testing.assert_close(y.cpu(), want, rtol=1e-12, atol=1e-12)

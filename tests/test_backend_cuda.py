"""What only the CUDA backend has: a CUDA build registers every CUDA kernel; host-side checks
(tensors on the wrong device, argument errors worded as on the CPU), reads that stay in bounds
when B or a pool is corrupt and validation is off (an illegal access surfaces at the
synchronize), and the batched backward's memory bound. The op tests that every backend shares
are tests/test_op_*.py (backend "cuda"); both skip without a GPU, except the registration test,
which runs on any machine whose build compiled the CUDA sources.
"""
from __future__ import annotations

import pytest
import torch

import lori_kernels as L

from cuda_cases import (B_IN, B_OUT, _assert_within, _bargs, _bgrad_refs, _bpools,
                        _value_bounds, make_b, ops)
from op_backends import SKIP

needs_cuda = pytest.mark.skipif(SKIP["cuda"] is not None, reason=SKIP["cuda"] or "")
CUDA_OPS = ("_random_a_fill", "philox4x32_10", "sparse_delta", "sparse_delta_fwd",
            "sparse_delta_backward", "merge_delta_", "batched_sparse_delta",
            "batched_sparse_delta_backward")


def _cuda_registered(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lori::{name}", "CUDA")


def test_cuda_kernels_registered_together():
    """A CUDA build registers every CUDA kernel (a C++-only build registers none)."""
    registered = [_cuda_registered(n) for n in CUDA_OPS]
    if not any(registered):
        pytest.skip("lori_kernels._C was built without CUDA sources")
    assert all(registered), dict(zip(CUDA_OPS, registered))


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


"""Case builders of the CUDA op tests (the "cuda" backend of tests/test_op_*.py and
tests/test_backend_cuda.py): B with a chosen mask kind, the CUDA tests' tolerance check (plain
torch in the same dtype on the GPU as the yardstick), and the batched pools (a CPU pool and its
CUDA copy) with per-adapter bounds. Nothing here launches a kernel at import."""
from __future__ import annotations

import functools

import torch

import lori_kernels  # noqa: F401  (registers torch.ops.lori)
from lori_kernels import reference, spec
from lori_kernels.packing import pack_bitmask
from lori_kernels.testing import tolerance_bound

from batched_cases import make_pool
from op_backends import copy_pool

ops = torch.ops.lori
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEED = 0x9E3779B97F4A7C15  # high bit set: exercises the uint64 seed path
SHAPES = [(4096, 4096, 32), (341, 129, 7), (1000, 70, 33), (72, 200, 64), (136, 65, 256)]
B_IN, B_OUT, B_RANK = 256, 320, 32


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


def _bpool(n, inp, out, rank, dtype, seed, device):
    """tests/batched_cases.py's make_pool (n adapters differing in sparsity, seed, distribution
    and scale), on device."""
    return make_pool(n, inp, out, rank, dtype=dtype, seed=seed).to(device)


@functools.lru_cache(maxsize=None)
def _bpools(n, inp=B_IN, out=B_OUT, rank=B_RANK, dtype=torch.float32, seed=1):
    """(CPU pool, CUDA pool) with the same adapters. Treat as read-only."""
    cpu = _bpool(n, inp, out, rank, dtype, seed, "cpu")
    return cpu, copy_pool(cpu, "cuda")


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


def _bad_args(T=4):
    pool = _bpools(3, seed=15)[1]
    x = torch.randn(T, B_IN, generator=torch.Generator().manual_seed(0)).cuda()
    return list(_bargs(pool, x, torch.zeros(T, dtype=torch.int32, device="cuda")))

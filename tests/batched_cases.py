"""Case builders shared by the batched-op tests (test_op_batched.py on every backend,
test_adapter_pool.py, test_backend_triton.py, cuda_cases.py): pools of adapters, adapter-id
mixes, the per-token loop references and the bad-argument cases of batched_sparse_delta."""
import functools

import torch

import lori_kernels as L
from lori_kernels import reference
from lori_kernels.testing import random_packed, tolerance_bound

IN, OUT, RANK = 256, 320, 32
DISTS = ["rademacher", "uniform"]
MIXES = ["distinct", "uniform8", "zipf64", "identical"]


@functools.lru_cache(maxsize=None)
def _a64(seed, rank, inp, dist):
    return reference.random_a(seed, rank, inp, dist).double()


def make_pool(n, inp=IN, out=OUT, rank=RANK, dtype=torch.float32, seed=0, **kw):
    """n adapters differing in sparsity, seed, distribution and scale (a CPU pool)."""
    g = torch.Generator().manual_seed(seed)
    pool = L.AdapterPool(inp, out, rank, dtype=dtype, **kw)
    for i in range(n):
        b = random_packed(out, rank, density=0.03 + 0.2 * (i % 5) / 4, generator=g, dtype=dtype)
        pool.add(f"a{i}", b, seed=1000 * seed + 17 * i + 3, distribution=DISTS[i % 2],
                 scale=0.25 + 0.5 * (i % 3))
    return pool


def mix_ids(mix, T, n, idle, g):
    """T adapter ids in [0, n) by popularity mix (one of MIXES); idle: ~20% of them -1."""
    if mix == "distinct":
        ids = torch.randperm(max(T, n), generator=g)[:T] % n
    elif mix == "uniform8":
        ids = torch.randint(0, min(8, n), (T,), generator=g)
    elif mix == "zipf64":
        p = 1.0 / torch.arange(1, min(64, n) + 1, dtype=torch.float64) ** 1.5
        ids = (torch.multinomial(p, T, replacement=True, generator=g) if T
               else torch.zeros(0, dtype=torch.long))
    else:  # identical
        ids = torch.full((T,), n // 2, dtype=torch.long)
    if idle and T:
        ids = torch.where(torch.rand(T, generator=g) < 0.2, -1, ids)
    return ids


def loop_references(x, ids, pool):
    """(loop of single-adapter sparse_delta, float64 reference, plain-torch baseline) per token."""
    T = x.shape[0]
    loop = torch.zeros(T, pool.out_features, dtype=x.dtype)
    base = torch.zeros(T, pool.out_features, dtype=x.dtype)
    for a in ids.unique().tolist():
        if a < 0:
            continue
        e = pool.get(pool._names[a])
        sel = (ids == a).nonzero().flatten()
        xs = x[sel]
        loop[sel] = L.sparse_delta(xs, e.packed, seed=e.seed, distribution=e.distribution,
                                   scale=e.scale)
        a64 = _a64(e.seed, pool.rank, x.shape[1], e.distribution)
        bd = e.packed.to_dense()
        base[sel] = reference.dense_lora(xs, a64.to(x.dtype), bd.to(x.dtype), e.scale)
    ref = reference.batched_sparse_delta(x, ids, *pool.op_args())
    return loop, ref, base


def check_rule(y, loop, ref, base, what="", *, ids=None):
    """The tolerance rule per adapter's rows when ids are given (adapters differ in scale and
    density: one bound for the whole output would hide a small adapter's errors); rows
    without an adapter must be exactly 0."""
    assert y.shape == ref.shape and y.dtype == loop.dtype
    if y.numel() == 0:
        return
    groups = [torch.arange(y.shape[0])] if ids is None else [
        (ids == a).nonzero().flatten() for a in ids.unique().tolist()]
    for rows in groups:
        a = None if ids is None else int(ids[rows[0]])
        if a is not None and a < 0:
            assert torch.count_nonzero(y[rows]) == 0, f"{what}: rows without an adapter not 0"
            continue
        bound = tolerance_bound(ref[rows], base[rows])
        err = (y[rows].double() - ref[rows]).abs().max().item()
        assert err <= bound, f"{what} (adapter {a}): error vs float64 {err:.3e} > bound {bound:.3e}"
        diff = (y[rows].double() - loop[rows].double()).abs().max().item()
        assert diff <= bound, (f"{what} (adapter {a}): differs from the sparse_delta loop by "
                               f"{diff:.3e} > {bound:.3e}")


# ---- bad arguments ------------------------------------------------------------------------------
# Mutations of the op's argument list [x, adapter_ids, masks, values, value_starts, offsets,
# seeds, scales, distributions, rank] and the error each must raise (the C++ op's messages).

def mutate_arg(i, fn):
    """In-place edit of argument i of the list: a[i] = fn(a[i])."""
    return lambda a: a.__setitem__(i, fn(a[i]))


BAD_ARGUMENTS = [
    (mutate_arg(1, lambda t: t.float()), TypeError, "adapter_ids must be int32 or int64"),
    (mutate_arg(1, lambda t: t[:-1]), ValueError, "adapter_ids must have shape"),
    (mutate_arg(2, lambda t: t[:, :, :0]), ValueError, "masks must have shape"),
    (mutate_arg(2, lambda t: t.long()), TypeError, "masks must be int32"),
    (mutate_arg(3, lambda t: t.double()), TypeError, "values dtype"),
    (mutate_arg(4, lambda t: t[:-1]), ValueError, "value_starts must have shape"),
    (mutate_arg(4, lambda t: t.int()), TypeError, "value_starts must be"),
    (mutate_arg(5, lambda t: t[:, :-1]), ValueError, "offsets must have shape"),
    (mutate_arg(6, lambda t: t.int()), TypeError, "seeds must be"),
    (mutate_arg(7, lambda t: t.double()), TypeError, "scales must be"),
    (mutate_arg(8, lambda t: t[:2]), ValueError, "distributions must have shape"),
    (mutate_arg(8, lambda t: t + 5), ValueError, "distributions\\[0\\] = 6"),
    (mutate_arg(9, lambda r: 64), ValueError, "masks must have shape"),  # not the pools' rank
    (mutate_arg(9, lambda r: 0), ValueError, "rank must be in"),
    (mutate_arg(4, lambda t: t + 10**6), ValueError, "do not lie within the values buffer"),
    (mutate_arg(4, lambda t: t - 1), ValueError, "do not lie within the values buffer"),
    (mutate_arg(5, lambda t: t + 1), ValueError, "offsets\\[0, 0\\] must be 0"),
]

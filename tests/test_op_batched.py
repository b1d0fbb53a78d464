"""batched_sparse_delta (many adapters of one AdapterPool per batch, one adapter id per token)
and its backward, on every backend: the C++ kernels on the CPU, Triton (under the interpreter
without a GPU) and the C++ CUDA kernels (skipped without a GPU), against a loop of
single-adapter sparse_delta calls and the float64 reference (tests/batched_cases.py).

Each test takes a `backend` (tests/op_backends.py); where the backends need different sizes
each keeps its own rows: the Triton interpreter costs milliseconds per program, so its pools
are small (in 40, out 70, rank 16); the CUDA rows use benchmark-sized pools and judge against
plain torch on the GPU (tests/cuda_cases.py). AdapterPool and LoRIPoolLinear themselves are
tested in tests/test_adapter_pool.py, Triton's token grouping in tests/test_backend_triton.py.
"""
import functools

import pytest
import torch

import lori_kernels as L
from lori_kernels import reference
from lori_kernels.testing import check_compile_fullgraph, random_packed, tolerance_bound

from batched_cases import (BAD_ARGUMENTS, IN, MIXES, OUT, RANK, _a64, check_rule,
                           loop_references, make_pool, mix_ids, mutate_arg)
from cuda_cases import (B_IN, B_OUT, B_RANK, DTYPES, _assert_within, _bad_args, _bargs, _bcheck,
                        _bgrad_refs, _bpools, _bref, _row_bounds, _value_bounds, ops)
from op_backends import backends, cases, pytest_id

T_IN, T_OUT, T_RANK = 40, 70, 16   # Triton's pools: out spans two 64-row chunks


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@functools.lru_cache(maxsize=None)
def _pool(n, inp, out, rank, dtype, seed):
    """A CPU pool (tests/batched_cases.make_pool); treat as read-only."""
    return make_pool(n, inp=inp, out=out, rank=rank, dtype=dtype, seed=seed)


def _run(backend, x, ids, pool, base=None):
    """The public wrapper on the backend's device (x, ids and base keep their strides where
    they are there already); the result on the CPU."""
    pool = pool if backend.device == "cpu" else backend.to(pool)  # read-only here
    y = L.batched_sparse_delta(backend.on(x), backend.on(ids), pool,
                               base=None if base is None else backend.on(base),
                               backend=backend.route)
    assert y.device.type == torch.device(backend.device).type
    return y.cpu()


# ---- forward -------------------------------------------------------------------------------------
# Pools: (capacity, in, out, rank, seed).

CPU_POOL64 = (64, IN, OUT, RANK, 1)
TRITON_POOL64 = (64, T_IN, T_OUT, T_RANK, 31)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("backend,pool_dims,T,idle,dtype", cases({
    "cpu": [(CPU_POOL64, T, idle, dt) for dt in [torch.float32, torch.bfloat16]
            for T in [0, 1, 7, 513] for idle in [False, True]],
    # T = 513 only with -1 ids mixed in: the interpreter spends seconds per such call.
    "triton": [(TRITON_POOL64, T, idle, torch.float32) for T, idle in [
        (0, False), (1, False), (1, True), (7, False), (7, True), (513, True)]],
}), ids=pytest_id)
def test_forward_mixes(backend, pool_dims, T, idle, dtype, mix):
    n, inp, out, rank, seed = pool_dims
    g = _gen(T * 7 + len(mix) + idle)
    pool = _pool(n, inp, out, rank, dtype, seed)
    ids = mix_ids(mix, T, n, idle, g)
    x = torch.randn(T, inp, generator=g).to(dtype)
    y = _run(backend, x, ids, pool)
    loop, ref, base = loop_references(x, ids, pool)
    check_rule(y, loop, ref, base, f"{mix} idle={idle} T={T}", ids=ids)
    if idle and T:
        assert torch.count_nonzero(y[ids < 0]) == 0
    if T and backend != "cpu":
        cpp = ops.batched_sparse_delta(x, ids, *pool.op_args())
        assert (y - cpp).abs().max() <= tolerance_bound(ref, base)


@pytest.mark.parametrize("backend,pool_dims,T", cases({
    "cpu": [(CPU_POOL64, 200)], "triton": [(TRITON_POOL64, 40)]}), ids=pytest_id)
def test_deterministic(backend, pool_dims, T):
    n, inp, out, rank, seed = pool_dims
    g = _gen(8)
    pool = _pool(n, inp, out, rank, torch.float32, seed)
    ids = mix_ids("zipf64", T, n, True, g)
    x = torch.randn(T, inp, generator=g)
    assert torch.equal(_run(backend, x, ids, pool), _run(backend, x, ids, pool))


@pytest.mark.parametrize("backend", backends("cpu", "cuda"))
def test_float64_matches_reference(backend):
    g = _gen(7)
    pool = _pool(4, 50, 70, 9, torch.float64, 6)
    ids = torch.tensor([3, 0, -1, 3, 1, 2, 2, 0])
    x = torch.randn(8, 50, generator=g, dtype=torch.float64)
    y = _run(backend, x, ids, pool)
    _, ref, _ = loop_references(x, ids, pool)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


# ---- backward ------------------------------------------------------------------------------------

def _dense_b(pool, a, v):
    e = pool.get(pool._names[a])
    start = int(pool.value_starts[a])
    return torch.zeros(pool.out_features, pool.rank, dtype=v.dtype).masked_scatter(
        e.packed.bool_mask(), v[start:start + e.packed.nnz]), e


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=pytest_id)
@pytest.mark.parametrize("backend,pool_dims,ids", cases({
    "cpu": [((5, IN, OUT, RANK, 7),
             [0, 1, 1, -1, 3, 0, 1, 3, 3, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])],
    "triton": [((5, T_IN, T_OUT, 33, 34), [0, 1, 1, -1, 3, 0, 1, 3, 3, 0] + [0] * 20 + [1, -1])],
}), ids=pytest_id)
def test_backward_multi_task_against_reference(backend, pool_dims, ids, dtype):
    """grad_x, grad of every used adapter's values and of base vs float64 autograd, through
    the public wrapper with the pool's values requiring grad."""
    n, inp, out, rank, seed = pool_dims
    g = _gen(5)
    pool = backend.to(make_pool(n, inp=inp, out=out, rank=rank, dtype=dtype, seed=seed))
    pool_cpu = make_pool(n, inp=inp, out=out, rank=rank, dtype=dtype, seed=seed)
    pool.values.requires_grad_()
    ids = torch.tensor(ids)
    T = ids.numel()
    x = backend.to(torch.randn(T, inp, generator=g).to(dtype)).requires_grad_()
    base = backend.to(torch.randn(T, out, generator=g).to(dtype)).requires_grad_()
    y = L.batched_sparse_delta(x, backend.to(ids), pool, base=base, backend=backend.route)
    gy = torch.randn(T, out, generator=g).to(dtype)
    y.backward(backend.to(gy))
    assert torch.equal(base.grad.cpu(), gy)
    values = pool_cpu.values
    x64 = x.detach().cpu().double().requires_grad_()
    v64 = values.detach().double().requires_grad_()
    xd = x.detach().cpu().clone().requires_grad_()
    vd = values.detach().clone().requires_grad_()
    y64 = torch.zeros(T, out, dtype=torch.float64)
    yd = torch.zeros(T, out, dtype=dtype)
    for a in (0, 1, 3):
        sel = (ids == a).nonzero().flatten()
        d64, e = _dense_b(pool_cpu, a, v64)
        dd, _ = _dense_b(pool_cpu, a, vd)
        a64 = _a64(e.seed, rank, inp, e.distribution)
        y64 = y64.index_add(0, sel, (x64[sel] @ a64.T) @ d64.T * e.scale)
        yd = yd.index_add(0, sel, reference.dense_lora(xd[sel], a64.to(dtype), dd, e.scale))
    y64.backward(gy.double())
    yd.backward(gy)
    gv_got = pool.values.grad.cpu()
    for got, r, b, what in [(x.grad.cpu(), x64.grad, xd.grad, "grad_x"),
                            (gv_got, v64.grad, vd.grad, "grad_values")]:
        err = (got.double() - r).abs().max().item()
        bound = tolerance_bound(r, b)
        assert err <= bound, f"{what}: {err:.3e} > {bound:.3e}"
    for a in (2, 4):   # unused adapters get exactly zero
        s, k = int(pool_cpu.value_starts[a]), pool_cpu.get(f"a{a}").packed.nnz
        assert torch.count_nonzero(gv_got[s:s + k]) == 0
    assert torch.count_nonzero(x.grad.cpu()[ids < 0]) == 0
    if backend != "cpu":
        gx, gv = ops.batched_sparse_delta_backward(gy, x.detach().cpu(), ids, *pool_cpu.op_args(),
                                                   True, True)
        assert (x.grad.cpu() - gx).abs().max() <= tolerance_bound(x64.grad, xd.grad)
        assert (gv_got - gv).abs().max() <= tolerance_bound(v64.grad, vd.grad)


@pytest.mark.parametrize("backend", backends("cpu", "triton"))
def test_empty_batch_backward(backend):
    pool = make_pool(2, inp=T_IN, out=T_OUT, rank=T_RANK, seed=36)
    masks, values, *rest = backend.batched_args(pool)
    v = values.clone().requires_grad_()
    x = torch.randn(0, T_IN, device=backend.device, requires_grad=True)
    y = backend.batched(x, torch.zeros(0, dtype=torch.int32, device=backend.device), masks, v,
                        *rest)
    assert y.shape == (0, T_OUT)
    y.sum().backward()
    assert x.grad.shape == (0, T_IN) and torch.count_nonzero(v.grad) == 0


@pytest.mark.parametrize("backend", backends())
def test_shared_value_ranges_sum_their_gradients(backend):
    """Two adapter slots over one value range: the gradient of the range is the sum."""
    b = random_packed(40, 8, generator=_gen(1))
    x = backend.to(torch.randn(4, 16, generator=_gen(2)))
    ids = backend.to(torch.tensor([0, 1, 0, 1], dtype=torch.int32))
    v = backend.to(b.values).requires_grad_()
    t = lambda *a, **k: backend.to(torch.tensor(*a, **k))  # noqa: E731
    y = backend.batched(
        x, ids, backend.to(torch.stack([b.mask, b.mask])), v, t([0, 0]),
        backend.to(torch.stack([b.offsets, b.offsets])), t([3, 3]), t([1.0, 1.0]),
        t([1, 1], dtype=torch.int32), 8)
    y.sum().backward()
    v2 = b.values.clone().requires_grad_()
    ops.sparse_delta(x.cpu(), b.mask, v2, b.offsets, 8, 3, "rademacher", 1.0).sum().backward()
    torch.testing.assert_close(v.grad.cpu(), v2.grad)


def _gradcheck_pool(size):
    """float64 pools for gradcheck: 'op' (3 adapters, in 13, out 66, rank 5) or 'tiny' (2
    adapters of in 7, out 5, rank 3: the interpreter's full Jacobian costs one call per
    element)."""
    if size == "op":
        return make_pool(3, inp=13, out=66, rank=5, dtype=torch.float64, seed=9), \
            [2, 0, -1, 2, 1, 0, 2]
    g = _gen(9)
    pool = L.AdapterPool(7, 5, 3, dtype=torch.float64)
    for i, dist in enumerate(("rademacher", "uniform")):
        pool.add(f"a{i}", random_packed(5, 3, density=0.5, generator=g, dtype=torch.float64),
                 seed=37 + i, distribution=dist, scale=0.5 + i)
    return pool, [1, -1, 0, 1]


@pytest.mark.parametrize("backend,size,fast", cases({
    "cpu": [("op", False)], "triton": [("tiny", True)], "cuda": [("op", False)]}),
    ids=pytest_id)
def test_gradcheck_float64(backend, size, fast):
    """x and the pool's values (base's gradient is grad_y itself:
    test_backward_multi_task_against_reference). Triton: fast_mode (random projections of
    the Jacobian)."""
    pool, ids = _gradcheck_pool(size)
    masks, values, starts, offsets, seeds, scales, dists, rank = backend.batched_args(pool)
    assert values.numel() >= 4   # the adapters have entries to check
    ids = backend.to(torch.tensor(ids))
    g = _gen(11)
    x = backend.to(torch.randn(ids.numel(), pool.in_features, generator=g,
                               dtype=torch.float64)).requires_grad_()
    v = values.clone().requires_grad_()
    base = backend.to(torch.randn(ids.numel(), pool.out_features, generator=g,
                                  dtype=torch.float64))
    threads = torch.get_num_threads()
    if backend == "cpu":
        torch.set_num_threads(1)  # ~500 tiny calls: thread wake-ups would dominate
    try:
        assert torch.autograd.gradcheck(
            lambda x, v: backend.batched(x, ids, masks, v, starts, offsets, seeds, scales, dists,
                                         rank, base),
            (x, v), fast_mode=fast)
    finally:
        torch.set_num_threads(threads)


# ---- op machinery --------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype,id_sets", cases({
    "cpu": [(dt, 2) for dt in [torch.float32, torch.bfloat16, torch.float64]],
    "triton": [(torch.float32, 1)],
    "cuda": [(dt, 2) for dt in [torch.float32, torch.bfloat16]],
}), ids=pytest_id)
def test_opcheck(backend, dtype, id_sets):
    g = _gen(12)
    pool = make_pool(4, inp=45, out=70, rank=33, dtype=dtype, seed=10)
    pargs = backend.batched_args(pool)
    fwd = backend.op("batched_sparse_delta").default
    bwd = backend.op("batched_sparse_delta_backward").default
    for ids in (torch.tensor([1, -1, 3, 1, 0]), torch.tensor([2] * 20 + [-1, 0]))[:id_sets]:
        T = ids.numel()
        x = backend.to(torch.randn(T, 45, generator=g).to(dtype))
        args = (x, backend.to(ids), *pargs)
        torch.library.opcheck(fwd, args)
        base = backend.to(torch.randn(T, 70, generator=g).to(dtype))
        torch.library.opcheck(fwd, (*args, base))
        gy = backend.to(torch.randn(T, 70, generator=g).to(dtype))
        torch.library.opcheck(bwd, (gy, *args, True, True))
    # with autograd: x and values require grad (and a base)
    xg = backend.to(torch.randn(5, 45, generator=g).to(dtype)).requires_grad_()
    masks, values, *rest = pargs
    ids = backend.to(torch.tensor([0, 1, 2, 3, -1]))
    torch.library.opcheck(fwd, (xg, ids, masks, values.clone().requires_grad_(), *rest))
    base = backend.to(torch.randn(5, 70, generator=g).to(dtype))
    torch.library.opcheck(fwd, (xg, ids, masks, values.clone().requires_grad_(), *rest, base))


@pytest.mark.parametrize("backend,pool_dims", cases({
    "cpu": [((4, 48, 64, 16, 11),)], "triton": [((4, T_IN, 64, T_RANK, 39),)]}),
    ids=pytest_id)
def test_torch_compile_fullgraph(backend, pool_dims):
    n, inp, out, rank, seed = pool_dims
    g = _gen(13)
    pool = make_pool(n, inp=inp, out=out, rank=rank, seed=seed)
    masks, values, starts, offsets, seeds, scales, dists, rank = backend.batched_args(pool)
    ids = backend.to(torch.tensor([3, 0, 0, -1, 2]))
    op = backend.op("batched_sparse_delta")

    def f(x, v):
        y = op(x, ids, masks, v, starts, offsets, seeds, scales, dists, rank)
        return torch.nn.functional.gelu(y).sum()

    check_compile_fullgraph(f, backend.to(torch.randn(5, inp, generator=g)), values.clone())


# ---- bad input: clear errors, never an out-of-bounds read ----------------------------------------

def _op_args(backend, pool, T=4):
    x = torch.randn(T, pool.in_features, generator=_gen(0))
    return [backend.to(x), backend.to(torch.zeros(T, dtype=torch.int32)),
            *backend.batched_args(pool)]


def _both(backend, a, exc, msg):
    """Forward and backward raise the same clear error."""
    with pytest.raises(exc, match=msg):
        backend.batched(*a)
    gy = torch.ones(a[0].shape[0] if a[0].dim() else 1, a[2].shape[1] if a[2].dim() == 3 else OUT,
                    device=backend.device,
                    dtype=a[0].dtype if a[0].is_floating_point() else torch.float32)
    with pytest.raises(exc, match=msg):
        backend.batched_backward(gy, *a, True, True)


@pytest.mark.parametrize("bad_id", [4, 1000, -2])
@pytest.mark.parametrize("backend,pool_dims", cases({
    "cpu": [((IN, OUT, RANK),)], "triton": [((T_IN, T_OUT, T_RANK),)],
    "cuda": [((IN, OUT, RANK),)]}),
    ids=pytest_id)
def test_adapter_id_out_of_range(backend, pool_dims, bad_id):
    pool = make_pool(4, *pool_dims, seed=12)  # capacity 4: ids 0..3 are slots
    a = _op_args(backend, pool)
    a[1] = backend.to(torch.tensor([0, bad_id, 1, 2], dtype=torch.int32))
    msg = f"adapter_ids\\[1\\] = {bad_id} is out of range for a pool of 4"
    _both(backend, a, ValueError, msg)
    a[1] = a[1].long()
    with pytest.raises(ValueError, match=msg):
        backend.batched(*a)
    with pytest.raises(ValueError, match="not a live slot"):
        pool.ids([0, bad_id])


_BAD_BATCHED = [
    (mutate_arg(0, lambda t: t.to(torch.int32)), TypeError, "x must be float"),
    *BAD_ARGUMENTS,
]
_BAD_CUDA = [  # the CUDA op's checks (forward): a subset of BAD_ARGUMENTS, and wrong devices
    (mutate_arg(1, lambda t: t.float()), TypeError, "adapter_ids must be int32 or int64"),
    (mutate_arg(1, lambda t: t[:-1]), ValueError, "adapter_ids must have shape"),
    (mutate_arg(2, lambda t: t[:, :, :0]), ValueError, "masks must have shape"),
    (mutate_arg(3, lambda t: t.double()), TypeError, "values dtype"),
    (mutate_arg(4, lambda t: t[:-1]), ValueError, "value_starts must have shape"),
    (mutate_arg(5, lambda t: t[:, :-1]), ValueError, "offsets must have shape"),
    (mutate_arg(7, lambda t: t.double()), TypeError, "scales must be"),
    (mutate_arg(8, lambda t: t + 5), ValueError, "distributions\\[0\\] = 6"),
    (mutate_arg(9, lambda r: 64), ValueError, "masks must have shape"),
    (mutate_arg(4, lambda t: t + 10**6), ValueError, "do not lie within the values buffer"),
    (mutate_arg(4, lambda t: t - 1), ValueError, "do not lie within the values buffer"),
    (mutate_arg(5, lambda t: t + 1), ValueError, "offsets\\[0, 0\\] must be 0"),
    (mutate_arg(2, lambda t: t.cpu()), RuntimeError, "masks is on cpu but x is on cuda"),
    (mutate_arg(1, lambda t: t.cpu()), RuntimeError, "adapter_ids is on cpu but x is on cuda"),
]


@pytest.mark.parametrize("backend,mutate,exc,msg,backward", cases({
    "cpu": [(*c, True) for c in _BAD_BATCHED],
    "triton": [(*c, True) for c in _BAD_BATCHED] + [
        (mutate_arg(3, lambda t: t.to("meta")), RuntimeError, "values is on meta", True)],
    "cuda": [(*c, False) for c in _BAD_CUDA],
}), ids=pytest_id)
def test_bad_arguments_raise_clear_errors(backend, mutate, exc, msg, backward):
    pool = make_pool(3, inp=T_IN, out=T_OUT, rank=T_RANK, seed=41) if backend == "triton" \
        else make_pool(3, seed=13)
    a = _op_args(backend, pool)
    mutate(a)
    if backward:
        _both(backend, a, exc, msg)
    else:
        with pytest.raises(exc, match=msg):
            backend.batched(*a)


@pytest.mark.parametrize("backend", backends("cpu", "triton"))
def test_bad_base_and_grad_y(backend):
    a = _op_args(backend, make_pool(2, inp=T_IN, out=T_OUT, rank=T_RANK, seed=42))
    dev = backend.device
    with pytest.raises(ValueError, match="base must have shape"):
        backend.batched(*a, torch.zeros(4, T_OUT + 1, device=dev))
    with pytest.raises(TypeError, match="base dtype"):
        backend.batched(*a, torch.zeros(4, T_OUT, device=dev, dtype=torch.float64))
    with pytest.raises(ValueError, match="grad_y must have shape"):
        backend.batched_backward(torch.zeros(3, T_OUT, device=dev), *a, True, True)


# ---- the C++ CPU kernels' paths (segment sizes, large shapes, accumulate form) and checks -------

@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("backend", backends("cpu"))
def test_segment_sizes_and_paths(backend, ids_dtype):
    """Segments of 1..4 tokens (expand B kernel), 5..16 (direct A, 8-token B kernel), > 16
    (GEMM A), contiguous runs and interleaved tokens, rank spanning two mask words."""
    g = _gen(3)
    pool = make_pool(6, inp=300, out=200, rank=40, seed=2)
    sizes = [1, 2, 3, 4, 9, 40]
    ids = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    for order in (ids, ids[torch.randperm(ids.numel(), generator=g)]):
        x = torch.randn(order.numel(), 300, generator=g)
        y = L.batched_sparse_delta(x, order.to(ids_dtype), pool)
        check_rule(y, *loop_references(x, order, pool), ids=order)


@pytest.mark.parametrize("backend", backends("cpu"))
def test_large_shape(backend):
    g = _gen(4)
    pool = make_pool(8, inp=1100, out=1100, rank=40, seed=3)
    ids = mix_ids("zipf64", 90, 8, True, g)
    x = torch.randn(90, 1100, generator=g)
    check_rule(L.batched_sparse_delta(x, ids, pool), *loop_references(x, ids, pool), ids=ids)


@pytest.mark.parametrize("backend", backends("cpu"))
def test_accumulate_form_and_3d(backend):
    g = _gen(5)
    pool = make_pool(5, seed=4)
    x = torch.randn(2, 6, IN, generator=g)
    ids = torch.tensor([0, 1, -1, 4, 4, 2, 3, -1, 0, 0, 1, 2])
    base = torch.randn(2, 6, OUT, generator=g)
    y = L.batched_sparse_delta(x, ids, pool, base=base)
    delta = L.batched_sparse_delta(x, ids, pool)
    assert y.shape == (2, 6, OUT) and delta.shape == (2, 6, OUT)
    torch.testing.assert_close(y, base + delta)
    flat = ids.reshape(-1) < 0
    assert torch.equal(y.reshape(-1, OUT)[flat], base.reshape(-1, OUT)[flat])
    assert torch.count_nonzero(delta.reshape(-1, OUT)[flat]) == 0
    check_rule(delta.reshape(-1, OUT), *loop_references(x.reshape(-1, IN), ids, pool), ids=ids)


@pytest.mark.parametrize("backend", backends("cpu"))
def test_noncontiguous_inputs(backend):
    g = _gen(25)
    pool = make_pool(4, seed=24)
    big = torch.randn(11, 2 * IN, generator=g)
    x = big[:, ::2]
    ids_big = torch.tensor([0, 9, 3, 9, 3, 9, -1, 9, 1, 9, 3, 9, 2, 9, 0, 9, 0, 9, 1, 9, 2, 9])
    ids = ids_big[::2]
    assert not x.is_contiguous() and not ids.is_contiguous()
    y = L.batched_sparse_delta(x, ids, pool)
    assert torch.equal(y, L.batched_sparse_delta(x.contiguous(), ids.contiguous(), pool))
    check_rule(y, *loop_references(x, ids, pool), ids=ids)


@pytest.mark.parametrize("backend", backends("cpu"))
def test_bf16_accumulate_rounds_once(backend):
    g = _gen(6)
    pool = make_pool(3, dtype=torch.bfloat16, seed=5)
    x = torch.randn(9, IN, generator=g).bfloat16()
    ids = torch.tensor([0, 1, 2, 0, 1, 2, 0, -1, 2])
    base = torch.randn(9, OUT, generator=g).bfloat16()
    y = L.batched_sparse_delta(x, ids, pool, base=base)
    _, ref, _ = loop_references(x, ids, pool)
    exact = (base.double() + ref)
    # one rounding of (base + delta): within 1 bf16 ulp of the exact sum (+ fp32 slack)
    err = (y.double() - exact).abs()
    assert (err <= exact.abs() * 2 ** -8 + 1e-3).all()


@pytest.mark.parametrize("backend", backends("cpu"))
def test_backward_needs_input_grad(backend):
    g = _gen(10)
    pool = make_pool(3, seed=8)
    ids = torch.tensor([0, 2, 1, 0])
    x = torch.randn(4, IN, generator=g, requires_grad=True)
    L.batched_sparse_delta(x, ids, pool).sum().backward()
    assert x.grad is not None and pool.values.grad is None
    args = (torch.ones(4, OUT), x.detach(), ids, *pool.op_args())
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(*args, True, False)
    assert gx.shape == x.shape and gv.numel() == 0
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(*args, False, True)
    assert gx.numel() == 0 and gv.shape == pool.values.shape


@pytest.mark.parametrize("T", [1, 3, 30])
@pytest.mark.parametrize("backend", backends("cpu"))
def test_corrupt_pool_is_caught_not_read_out_of_bounds(backend, T):
    """Masks or offsets that disagree are caught before any value is read, on every path."""
    pool = make_pool(3, seed=14)
    for corrupt in ("mask_bit", "middle_offset", "last_offset"):
        masks, values, starts, offsets, seeds, scales, dists, rank = (
            t.clone() if isinstance(t, torch.Tensor) else t for t in pool.op_args())
        if corrupt == "mask_bit":
            masks[1, 5, 0] ^= 1 << 3
        elif corrupt == "middle_offset":
            offsets[1, 2] += 10**6
        else:
            offsets[1, -1] -= 1
        x = torch.randn(T, IN, generator=_gen(T))
        ids = torch.ones(T, dtype=torch.int32)
        with pytest.raises(ValueError, match="adapter 1"):
            torch.ops.lori.batched_sparse_delta(x, ids, masks, values, starts, offsets, seeds,
                                                scales, dists, rank)
        with pytest.raises(ValueError, match="adapter 1"):
            torch.ops.lori.batched_sparse_delta_backward(
                torch.ones(T, OUT), x, ids, masks, values, starts, offsets, seeds, scales, dists,
                rank, True, True)


@pytest.mark.parametrize("backend", backends("cpu"))
def test_device_mismatch_is_named(backend):
    pool = make_pool(2, seed=15)
    a = _op_args(backend, pool)
    a[2] = a[2].to("meta")
    with pytest.raises((RuntimeError, NotImplementedError), match="masks|meta"):
        torch.ops.lori.batched_sparse_delta(*a)


@pytest.mark.parametrize("backend", backends("cpu"))
def test_value_start_overflow_is_rejected(backend):
    # value_start + nnz wrapping past int64 must not pass the range check (review finding).
    b = random_packed(40, 8, generator=torch.Generator().manual_seed(0))
    nnz = b.nnz
    args = (torch.randn(2, 16), torch.zeros(2, dtype=torch.int32), b.mask[None], b.values,
            torch.tensor([2**63 - nnz], dtype=torch.int64), b.offsets[None],
            torch.tensor([1], dtype=torch.int64), torch.tensor([1.0]),
            torch.tensor([1], dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="values buffer"):
        torch.ops.lori.batched_sparse_delta(*args)



# ---- Triton: dtypes, the accumulate form, long segments, host-side content checks ---------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("backend", backends("triton"))
def test_forward_dtypes(backend, dtype):
    g = _gen(2)
    pool = make_pool(8, inp=T_IN, out=T_OUT, rank=33, dtype=dtype, seed=32)  # rank 33: two words
    ids = mix_ids("zipf64", 40, 8, True, g)
    x = torch.randn(40, T_IN, generator=g).to(dtype)
    y = _run(backend, x, ids, pool)
    assert y.dtype == dtype
    loop, ref, base = loop_references(x, ids, pool)
    check_rule(y, loop, ref, base, str(dtype), ids=ids)
    if dtype == torch.float64:
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", backends("triton"))
def test_base_accumulate_3d_and_noncontiguous(backend, dtype):
    g = _gen(3)
    pool = make_pool(5, inp=T_IN, out=T_OUT, rank=T_RANK, dtype=dtype, seed=33)
    x = torch.randn(2, 6, 2 * T_IN, generator=g).to(dtype)[..., ::2]   # non-contiguous, 3-D
    ids = torch.tensor([0, 1, -1, 4, 4, 2, 3, -1, 0, 0, 1, 2])
    base = torch.randn(2, 6, T_OUT, generator=g).to(dtype)
    y = _run(backend, x, ids, pool, base)
    delta = _run(backend, x, ids, pool)
    assert y.shape == (2, 6, T_OUT) and delta.shape == (2, 6, T_OUT)
    idle = ids < 0
    assert torch.equal(y.reshape(-1, T_OUT)[idle], base.reshape(-1, T_OUT)[idle])
    assert torch.count_nonzero(delta.reshape(-1, T_OUT)[idle]) == 0
    # base + delta rounded once: within the rule of the exact sum
    _, ref, bl = loop_references(x.reshape(-1, T_IN), ids, pool)
    exact = base.reshape(-1, T_OUT).double() + ref
    assert (y.reshape(-1, T_OUT).double() - exact).abs().max() <= tolerance_bound(
        exact, base.reshape(-1, T_OUT) + bl)
    cpp = ops.batched_sparse_delta(x, ids, *pool.op_args(), base)
    torch.testing.assert_close(y, cpp, **({} if dtype == torch.float32 else
                                          dict(rtol=2 ** -7, atol=2 ** -7)))


@pytest.mark.parametrize("backend", backends("triton"))
def test_backward_long_segment_and_needs_input_grad(backend):
    # 150 tokens of one adapter: several token tiles summed in the gv kernel's loop.
    g = _gen(6)
    pool = make_pool(3, inp=T_IN, out=T_OUT, rank=T_RANK, seed=35)
    ids = torch.cat([torch.full((150,), 2), torch.tensor([0, -1, 1])])
    x = torch.randn(153, T_IN, generator=g)
    gy = torch.randn(153, T_OUT, generator=g)
    args = (gy.to(backend.device), x.to(backend.device), ids.to(backend.device), *backend.batched_args(pool))
    gx, gv = backend.batched_backward(*args, True, True)
    cx, cv = ops.batched_sparse_delta_backward(gy, x, ids, *pool.op_args(), True, True)
    torch.testing.assert_close(gx.cpu(), cx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gv.cpu(), cv, rtol=1e-4, atol=1e-4)
    gx2, gv2 = backend.batched_backward(*args, True, False)
    assert torch.equal(gx2, gx) and gv2.numel() == 0
    gx3, gv3 = backend.batched_backward(*args, False, True)
    assert gx3.numel() == 0 and torch.equal(gv3, gv)
    masks, values, *rest = backend.batched_args(pool)
    xr = x.to(backend.device).requires_grad_()
    backend.batched(xr, ids.to(backend.device), masks, values, *rest).sum().backward()
    assert xr.grad is not None and values.grad is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="bitmask contents are validated on the host for CPU")
@pytest.mark.parametrize("backend", backends("triton"))
def test_corrupt_pool_is_caught(backend):
    pool = make_pool(3, inp=T_IN, out=T_OUT, rank=T_RANK, seed=43)
    for corrupt in ("mask_bit", "stray_bit", "middle_offset", "last_offset"):
        masks, values, starts, offsets, seeds, scales, dists, rank = (
            t.clone() if isinstance(t, torch.Tensor) else t for t in pool.op_args())
        if corrupt == "mask_bit":
            masks[1, 5, 0] ^= 1 << 3
        elif corrupt == "stray_bit":
            masks[1, 5, 0] |= 1 << 20   # bit 20 >= rank 16
        elif corrupt == "middle_offset":
            offsets[1, 1] += 10**6
        else:
            offsets[1, -1] -= 1
        a = [torch.randn(3, T_IN), torch.tensor([0, 1, 1]), masks, values, starts, offsets, seeds,
             scales, dists, rank]
        _both(backend, a, ValueError, "adapter 1")
        a[1] = torch.tensor([0, 2, -1])   # the corrupt adapter unused: runs
        backend.batched(*a)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the meta device stands in for a wrong device here")
@pytest.mark.parametrize("backend", backends("triton"))
def test_skipped_checks_still_never_read_out_of_bounds(backend, monkeypatch):
    """Validation off (no sync): bad ids act as -1, extents are clamped."""
    L.set_validation("off")
    pool = make_pool(3, inp=T_IN, out=T_OUT, rank=T_RANK, seed=44)
    x = torch.randn(4, T_IN, generator=_gen(12))
    masks, values, starts, *rest = pool.op_args()
    y = backend.batched(x, torch.tensor([0, 99, -7, 2]), masks, values, starts,
                                         *rest)
    assert torch.count_nonzero(y[1:3]) == 0
    good = backend.batched(x, torch.tensor([0, -1, -1, 2]), masks, values,
                                            starts, *rest)
    assert torch.equal(y, good)
    # an extent past the buffer's end: reads clamped to the buffer (a view with no spare room)
    short = values[: int(starts[2])]
    y = backend.batched(x, torch.tensor([0, 2, 2, 2]), masks, short, starts,
                                         *rest)
    assert torch.equal(y[0], good[0]) and torch.count_nonzero(y[1:]) == 0  # adapter 2: empty



# ---- CUDA: benchmark-sized pools, judged against plain torch on the GPU and the CPU op -------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 7, 513])
@pytest.mark.parametrize("idle", [False, True])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("backend", backends("cuda"))
def test_batched_forward_mixes(backend, mix, idle, T, dtype):
    pools = _bpools(64, dtype=dtype)
    g = torch.Generator().manual_seed(T * 7 + len(mix))
    ids = mix_ids(mix, T, 64, idle, g).to(torch.int32)
    x = torch.randn(T, B_IN, generator=g).to(dtype).cuda()
    y = torch.ops.lori.batched_sparse_delta(*_bargs(pools[1], x, ids.cuda()))
    _bcheck(y, x, ids, pools, f"{mix} idle={idle} T={T}")
    if idle and T:
        assert torch.count_nonzero(y[ids.cuda() < 0]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True], ids=["delta", "base"])
@pytest.mark.parametrize("n", [6, 8])
@pytest.mark.parametrize("backend", backends("cuda"))
def test_batched_forward_large_tiles(backend, n, with_base, dtype):
    """A pool of capacity 8: T = 513 tokens over at most 8 groups averages more than 16 tokens
    per group, so the forward runs its 64-token tiles (forward_mixes' capacity-64 pool gets
    16-token tiles); -1 tokens mixed in, with and without base."""
    pools = _bpools(n, dtype=dtype, seed=17)
    assert pools[1].capacity == 8
    T = 513
    g = torch.Generator().manual_seed(n + 100)
    ids = torch.randint(0, n, (T,), generator=g)
    ids = torch.where(torch.rand(T, generator=g) < 0.2, -1, ids)
    x = torch.randn(T, B_IN, generator=g).to(dtype).cuda()
    args = _bargs(pools[1], x, ids.cuda())
    delta = torch.ops.lori.batched_sparse_delta(*args)
    _bcheck(delta, x, ids, pools, f"n={n} {dtype}")
    idle = ids.cuda() < 0
    assert torch.count_nonzero(delta[idle]) == 0
    if not with_base:
        return
    base = torch.randn(T, B_OUT, generator=g).to(dtype).cuda()
    y = torch.ops.lori.batched_sparse_delta(*args, base)
    assert torch.equal(y[idle], base[idle])
    # base + delta rounded once: within one ulp of the exact sum (+ the delta's own error)
    ref, plain = _bref(x, ids, pools[0])
    exact = base.double().cpu() + ref
    _assert_within(y, exact, exact.abs() * torch.finfo(dtype).eps + _row_bounds(ref, plain, ids),
                   "base + delta")


@pytest.mark.parametrize("shape", [(300, 200, 40), (70, 130, 256), (1100, 1100, 33), (45, 70, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("T", [1, 16, 17, 300])
@pytest.mark.parametrize("backend", backends("cuda"))
def test_batched_shapes_and_tiles(backend, shape, T):
    """Odd shapes, ranks over two mask words and > 128 (small tiles), one-token segments and
    segments longer than a tile, contiguous runs and interleaved tokens."""
    inp, out, rank = shape
    pools = _bpools(6, inp, out, rank, torch.float32, seed=2)
    g = torch.Generator().manual_seed(T + rank)
    runs = torch.arange(6).repeat_interleave((T + 5) // 6)[:T]
    for ids in (runs, runs[torch.randperm(T, generator=g)]):
        x = torch.randn(T, inp, generator=g).cuda()
        y = torch.ops.lori.batched_sparse_delta(*_bargs(pools[1], x, ids.cuda()))
        _bcheck(y, x, ids, pools, f"{shape} T={T}")


@pytest.mark.parametrize("T,k", [(64, 1), (64, 8), (64, 64), (513, 8)])
@pytest.mark.parametrize("backend", backends("cuda"))
def test_batched_full_size_bf16(backend, T, k):
    """in = out = 4096, rank 32 (the benchmark shape), decode over 1/8/64 adapters and prefill."""
    pools = _bpools(64, 4096, 4096, 32, torch.bfloat16, seed=3)
    g = torch.Generator().manual_seed(T + k)
    ids = torch.randperm(T, generator=g) % k
    x = torch.randn(T, 4096, generator=g).bfloat16().cuda()
    y = torch.ops.lori.batched_sparse_delta(*_bargs(pools[1], x, ids.cuda()))
    _bcheck(y, x, ids, pools, f"T={T} k={k}")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("backend", backends("cuda"))
def test_batched_accumulate_3d_noncontiguous(backend, dtype):
    pools = _bpools(5, dtype=dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    big = torch.randn(2, 6, 2 * B_IN, generator=g).to(dtype).cuda()
    x = big[..., ::2]  # (2, 6, IN), non-contiguous
    ids_big = torch.tensor([0, 9, 1, 9, -1, 9, 4, 9, 4, 9, 2, 9, 3, 9, -1, 9, 0, 9, 0, 9, 1, 9, 2, 9])
    ids = ids_big[::2].cuda()
    base = torch.randn(2, 6, B_OUT, generator=g).to(dtype).cuda()
    y = torch.ops.lori.batched_sparse_delta(*_bargs(pools[1], x, ids), base)
    delta = torch.ops.lori.batched_sparse_delta(*_bargs(pools[1], x, ids))
    assert y.shape == (2, 6, B_OUT) and delta.shape == (2, 6, B_OUT)
    assert torch.equal(delta, torch.ops.lori.batched_sparse_delta(
        *_bargs(pools[1], x.contiguous(), ids.contiguous())))
    _bcheck(delta, x, ids.cpu(), pools)
    idle = ids.reshape(-1) < 0
    assert torch.equal(y.reshape(-1, B_OUT)[idle], base.reshape(-1, B_OUT)[idle])
    assert torch.count_nonzero(delta.reshape(-1, B_OUT)[idle]) == 0
    # base + delta rounded once: within one ulp of the exact sum (+ the delta's own error)
    ref, plain = _bref(x.reshape(-1, B_IN), ids.cpu(), pools[0])
    exact = base.reshape(-1, B_OUT).double().cpu() + ref
    slack = _row_bounds(ref, plain, ids)
    _assert_within(y.reshape(-1, B_OUT), exact, exact.abs() * torch.finfo(dtype).eps + slack,
                   "base + delta")


@pytest.mark.parametrize("backend", backends("cuda"))
def test_batched_deterministic_and_unvalidated_path(backend, monkeypatch):
    """Repeat calls are bitwise equal; validation off (no sync; grids sized by the tile
    bound, so the split-K slicing may differ) stays within the rule."""
    pools = _bpools(64, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(8)
    ids = mix_ids("zipf64", 300, 64, True, g).cuda()
    x = torch.randn(300, B_IN, generator=g).bfloat16().cuda()
    gy = torch.randn(300, B_OUT, generator=g).bfloat16().cuda()
    args = _bargs(pools[1], x, ids)
    y1 = torch.ops.lori.batched_sparse_delta(*args)
    g1 = torch.ops.lori.batched_sparse_delta_backward(gy, *args, True, True)
    assert torch.equal(y1, torch.ops.lori.batched_sparse_delta(*args))
    assert all(torch.equal(a, b) for a, b in
               zip(g1, torch.ops.lori.batched_sparse_delta_backward(gy, *args, True, True)))
    L.set_validation("off")
    _bcheck(torch.ops.lori.batched_sparse_delta(*args), x, ids.cpu(), pools, "unvalidated")
    g2 = torch.ops.lori.batched_sparse_delta_backward(gy, *args, True, True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 513])
@pytest.mark.parametrize("mix", ["distinct", "uniform8", "identical"])
@pytest.mark.parametrize("shape", [(B_IN, B_OUT, B_RANK), (300, 200, 40), (70, 130, 256)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", backends("cuda"))
def test_batched_backward(backend, shape, mix, T, dtype):
    """grad_x and the grad of every used adapter's values vs float64 autograd (the rule) and the
    CPU op; unused adapters and -1 tokens get exactly 0. Shapes: one mask word with multiples
    of 64; two words with a partial last chunk, column tile and mask word; rank 256 (8 words,
    small tiles) with in_features under one column tile."""
    inp, out, rank = shape
    n = 12
    pools = _bpools(n, inp, out, rank, dtype, seed=9)
    g = torch.Generator().manual_seed(T + len(mix))
    ids = mix_ids(mix, T, n, True, g)
    x = torch.randn(T, inp, generator=g).to(dtype)
    gy = torch.randn(T, out, generator=g).to(dtype)
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(
        gy.cuda(), *_bargs(pools[1], x.cuda(), ids.cuda()), True, True)
    gx_cpu, gv_cpu = torch.ops.lori.batched_sparse_delta_backward(
        gy, *_bargs(pools[0], x, ids), True, True)
    (rx, rv), (px, pv) = _bgrad_refs(x.cuda(), ids, pools[0], gy.cuda())
    bounds = (_row_bounds(rx, px, ids), _value_bounds(rv, pv, ids, pools[0]))
    for got, cpu, r, bound, what in ((gx, gx_cpu, rx, bounds[0], "grad_x"),
                                     (gv, gv_cpu, rv, bounds[1], "grad_values")):
        assert got.shape == cpu.shape and got.dtype == dtype, what
        _assert_within(got, r, bound, f"{what} vs float64")
        _assert_within(got, cpu, bound, f"{what} vs CPU op")
    used = set(ids.tolist())
    for a in range(n):
        if a not in used:
            s, k = int(pools[0].value_starts[a]), pools[0].get(f"a{a}").packed.nnz
            assert torch.count_nonzero(gv[s:s + k]) == 0
    assert torch.count_nonzero(gx[ids.cuda() < 0]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", backends("cuda"))
def test_batched_backward_single_and_multi_tile_groups(backend, dtype, monkeypatch):
    """grad_values cuts each adapter's tokens into tiles of >= 32: adapters with hundreds of
    tokens (several tiles, summed through per-slot partials) next to adapters with a few tokens
    (one tile, added straight into grad_values) and -1 tokens. Within the rule per adapter,
    bitwise repeatable, and the unvalidated path (slot buffer sized by its bound) agrees."""
    n = 40
    pools = _bpools(n, dtype=dtype, seed=18)
    g = torch.Generator().manual_seed(19)
    light = torch.arange(3, n).repeat_interleave(torch.randint(1, 9, (n - 3,), generator=g))
    ids = torch.cat([torch.zeros(900, dtype=torch.long), torch.ones(500, dtype=torch.long),
                     torch.full((100,), 2), light, torch.full((50,), -1)])
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    T = ids.numel()
    x = torch.randn(T, B_IN, generator=g).to(dtype)
    gy = torch.randn(T, B_OUT, generator=g).to(dtype)
    args = (gy.cuda(), *_bargs(pools[1], x.cuda(), ids.cuda()), True, True)
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(*args)
    (rx, rv), (px, pv) = _bgrad_refs(x.cuda(), ids, pools[0], gy.cuda())
    _assert_within(gx, rx, _row_bounds(rx, px, ids), "grad_x vs float64")
    _assert_within(gv, rv, _value_bounds(rv, pv, ids, pools[0]), "grad_values vs float64")
    gx2, gv2 = torch.ops.lori.batched_sparse_delta_backward(*args)
    assert torch.equal(gx, gx2) and torch.equal(gv, gv2)
    L.set_validation("off")
    gx3, gv3 = torch.ops.lori.batched_sparse_delta_backward(*args)
    torch.testing.assert_close(gx3, gx)
    torch.testing.assert_close(gv3, gv)


@pytest.mark.parametrize("backend", backends("cuda"))
def test_batched_autograd_flags_and_empty(backend):
    pools = _bpools(3, seed=10)
    pool = pools[1]
    ids = torch.tensor([0, 2, 1, -1], device="cuda")
    x = torch.randn(4, B_IN, device="cuda", requires_grad=True)
    v = pool.values.detach().clone().requires_grad_()
    base = torch.randn(4, B_OUT, device="cuda", requires_grad=True)
    y = torch.ops.lori.batched_sparse_delta(*_bargs(pool, x, ids, v), base)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert torch.equal(base.grad, gy)
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(gy, *_bargs(pool, x.detach(), ids),
                                                          True, True)
    assert torch.equal(x.grad, gx) and torch.equal(v.grad, gv)
    args = (gy, *_bargs(pool, x.detach(), ids))
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(*args, True, False)
    assert gx.shape == x.shape and gv.numel() == 0
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(*args, False, True)
    assert gx.numel() == 0 and gv.shape == pool.values.shape
    # T = 0, and a batch with no adapter at all
    x0 = torch.randn(0, B_IN, device="cuda")
    ids0 = torch.zeros(0, dtype=torch.int32, device="cuda")
    assert torch.ops.lori.batched_sparse_delta(*_bargs(pool, x0, ids0)).shape == (0, B_OUT)
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(
        torch.randn(0, B_OUT, device="cuda"), *_bargs(pool, x0, ids0), True, True)
    assert gx.shape == (0, B_IN) and torch.count_nonzero(gv) == 0
    none = torch.full((4,), -1, device="cuda")
    assert torch.count_nonzero(torch.ops.lori.batched_sparse_delta(*_bargs(pool, x.detach(), none))) == 0
    gx, gv = torch.ops.lori.batched_sparse_delta_backward(gy, *_bargs(pool, x.detach(), none),
                                                          True, True)
    assert torch.count_nonzero(gx) == 0 and torch.count_nonzero(gv) == 0


"""batched_sparse_delta, AdapterPool and LoRIPoolLinear on CPU, against a loop of
single-adapter sparse_delta calls and the float64 reference."""
import functools

import pytest
import torch

import lori_kernels as L
from lori_kernels import reference
from lori_kernels.testing import check_compile_fullgraph, random_packed, tolerance_bound

from batched_cases import (BAD_ARGUMENTS, IN, MIXES, OUT, RANK, _a64, check_rule,
                           loop_references, make_pool, mix_ids)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@functools.lru_cache(maxsize=None)
def _pool64(dtype):
    return make_pool(64, dtype=dtype, seed=1)


# ---- forward: popularity mixes ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [0, 1, 7, 513])
@pytest.mark.parametrize("idle", [False, True])
@pytest.mark.parametrize("mix", MIXES)
def test_forward_mixes(mix, idle, T, dtype):
    g = _gen(T * 7 + len(mix))
    pool = _pool64(dtype)
    ids = mix_ids(mix, T, 64, idle, g)
    x = torch.randn(T, IN, generator=g).to(dtype)
    y = L.batched_sparse_delta(x, ids, pool)
    loop, ref, base = loop_references(x, ids, pool)
    check_rule(y, loop, ref, base, f"{mix} idle={idle} T={T}", ids=ids)
    if idle and T:
        assert torch.count_nonzero(y[ids < 0]) == 0


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_segment_sizes_and_paths(ids_dtype):
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


def test_large_shape():
    g = _gen(4)
    pool = make_pool(8, inp=1100, out=1100, rank=40, seed=3)
    ids = mix_ids("zipf64", 90, 8, True, g)
    x = torch.randn(90, 1100, generator=g)
    check_rule(L.batched_sparse_delta(x, ids, pool), *loop_references(x, ids, pool), ids=ids)


def test_accumulate_form_and_3d():
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


def test_noncontiguous_inputs():
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


def test_bf16_accumulate_rounds_once():
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


def test_float64_matches_reference():
    g = _gen(7)
    pool = make_pool(4, inp=50, out=70, rank=9, dtype=torch.float64, seed=6)
    ids = torch.tensor([3, 0, -1, 3, 1, 2, 2, 0])
    x = torch.randn(8, 50, generator=g, dtype=torch.float64)
    y = L.batched_sparse_delta(x, ids, pool)
    _, ref, _ = loop_references(x, ids, pool)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_deterministic():
    g = _gen(8)
    pool = _pool64(torch.float32)
    ids = mix_ids("zipf64", 200, 64, True, g)
    x = torch.randn(200, IN, generator=g)
    assert torch.equal(L.batched_sparse_delta(x, ids, pool), L.batched_sparse_delta(x, ids, pool))


# ---- backward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_multi_task(dtype):
    """grad_x, grad of every used adapter's B values and of base, vs float64 autograd."""
    g = _gen(9)
    pool = make_pool(5, dtype=dtype, seed=7)
    pool.values.requires_grad_()
    ids = torch.tensor([0, 1, 1, -1, 3, 0, 1, 3, 3, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    x = torch.randn(ids.numel(), IN, generator=g).to(dtype).requires_grad_()
    base = torch.randn(ids.numel(), OUT, generator=g).to(dtype).requires_grad_()
    y = L.batched_sparse_delta(x, ids, pool, base=base)
    gy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(gy)
    assert torch.equal(base.grad, gy)
    # float64 reference through autograd, and plain torch in dtype as the yardstick
    x64 = x.detach().double().requires_grad_()
    v64 = pool.values.detach().double().requires_grad_()
    xd = x.detach().clone().requires_grad_()
    vd = pool.values.detach().clone().requires_grad_()
    y64 = torch.zeros(ids.numel(), OUT, dtype=torch.float64)
    yd = torch.zeros(ids.numel(), OUT, dtype=dtype)
    for a in [0, 1, 3]:
        e = pool.get(f"a{a}")
        sel = (ids == a).nonzero().flatten()
        start, nnz = int(pool.value_starts[a]), e.packed.nnz
        m = e.packed.bool_mask()
        d64 = torch.zeros(OUT, RANK, dtype=torch.float64).masked_scatter(m, v64[start:start + nnz])
        dd = torch.zeros(OUT, RANK, dtype=dtype).masked_scatter(m, vd[start:start + nnz])
        a64 = _a64(e.seed, RANK, IN, e.distribution)
        y64 = y64.index_add(0, sel, (x64[sel] @ a64.T) @ d64.T * e.scale)
        yd = yd.index_add(0, sel, reference.dense_lora(xd[sel], a64.to(dtype), dd, e.scale))
    y64.backward(gy.double())
    yd.backward(gy)
    for got, r, b, what in [(x.grad, x64.grad, xd.grad, "grad_x"),
                            (pool.values.grad, v64.grad, vd.grad, "grad_values")]:
        bound = tolerance_bound(r, b)
        err = (got.double() - r).abs().max().item()
        assert err <= bound, f"{what}: {err:.3e} > {bound:.3e}"
    # unused adapters (2, 4) get exactly zero
    for a in (2, 4):
        s, n = int(pool.value_starts[a]), pool.get(f"a{a}").packed.nnz
        assert torch.count_nonzero(pool.values.grad[s:s + n]) == 0
    assert torch.count_nonzero(x.grad[ids < 0]) == 0


def test_backward_needs_input_grad():
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


def test_gradcheck_float64():
    """x and the pool's values (base's gradient is grad_y itself: test_backward_multi_task)."""
    g = _gen(11)
    pool = make_pool(3, inp=13, out=66, rank=5, dtype=torch.float64, seed=9)
    ids = torch.tensor([2, 0, -1, 2, 1, 0, 2])
    x = torch.randn(7, 13, generator=g, dtype=torch.float64, requires_grad=True)
    v = pool.values.detach().clone().requires_grad_()
    base = torch.randn(7, 66, generator=g, dtype=torch.float64)
    masks, _, starts, offsets, seeds, scales, dists, rank = pool.op_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~500 tiny calls: thread wake-ups would dominate
    try:
        torch.autograd.gradcheck(
            lambda x, v: torch.ops.lori.batched_sparse_delta(
                x, ids, masks, v, starts, offsets, seeds, scales, dists, rank, base),
            (x, v))
    finally:
        torch.set_num_threads(threads)


# ---- op machinery -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    g = _gen(12)
    pool = make_pool(4, inp=45, out=70, rank=33, dtype=dtype, seed=10)
    for ids in (torch.tensor([1, -1, 3, 1, 0]), torch.tensor([2] * 20 + [-1, 0])):
        T = ids.numel()
        x = torch.randn(T, 45, generator=g).to(dtype)
        args = (x, ids, *pool.op_args())
        torch.library.opcheck(torch.ops.lori.batched_sparse_delta.default, args)
        base = torch.randn(T, 70, generator=g).to(dtype)
        torch.library.opcheck(torch.ops.lori.batched_sparse_delta.default, (*args, base))
        gy = torch.randn(T, 70, generator=g).to(dtype)
        torch.library.opcheck(torch.ops.lori.batched_sparse_delta_backward.default,
                              (gy, *args, True, True))
    xg = torch.randn(5, 45, generator=g).to(dtype).requires_grad_()
    masks, values, *rest = pool.op_args()
    torch.library.opcheck(torch.ops.lori.batched_sparse_delta.default,
                          (xg, torch.tensor([0, 1, 2, 3, -1]), masks,
                           values.clone().requires_grad_(), *rest))


def test_torch_compile_fullgraph():
    g = _gen(13)
    pool = make_pool(4, inp=48, out=64, rank=16, seed=11)
    masks, values, starts, offsets, seeds, scales, dists, rank = pool.op_args()
    ids = torch.tensor([3, 0, 0, -1, 2])

    def f(x, v):
        y = torch.ops.lori.batched_sparse_delta(x, ids, masks, v, starts, offsets, seeds, scales,
                                                dists, rank)
        return torch.nn.functional.gelu(y).sum()

    check_compile_fullgraph(f, torch.randn(5, 48, generator=g), values.clone())


# ---- errors: never an out-of-bounds read ------------------------------------------------------

def _op_args(pool, T=4):
    x = torch.randn(T, pool.in_features, generator=_gen(0))
    return [x, torch.zeros(T, dtype=torch.int32), *pool.op_args()]


@pytest.mark.parametrize("bad_id", [4, 1000, -2])
def test_adapter_id_out_of_range(bad_id):
    pool = make_pool(4, seed=12)
    a = _op_args(pool)
    a[1] = torch.tensor([0, bad_id, 1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=f"adapter_ids\\[1\\] = {bad_id} is out of range"):
        torch.ops.lori.batched_sparse_delta(*a)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.lori.batched_sparse_delta_backward(torch.ones(4, OUT), *a, True, True)
    with pytest.raises(ValueError, match="not a live slot"):
        pool.ids([0, bad_id])


@pytest.mark.parametrize("mutate,exc,msg", BAD_ARGUMENTS)
def test_bad_arguments_raise_clear_errors(mutate, exc, msg):
    pool = make_pool(3, seed=13)
    a = _op_args(pool)
    mutate(a)
    with pytest.raises(exc, match=msg):
        torch.ops.lori.batched_sparse_delta(*a)


@pytest.mark.parametrize("T", [1, 3, 30])
def test_corrupt_pool_is_caught_not_read_out_of_bounds(T):
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


def test_device_mismatch_is_named():
    pool = make_pool(2, seed=15)
    a = _op_args(pool)
    a[2] = a[2].to("meta")
    with pytest.raises((RuntimeError, NotImplementedError), match="masks|meta"):
        torch.ops.lori.batched_sparse_delta(*a)


# ---- AdapterPool ------------------------------------------------------------------------------

def test_pool_add_remove_lookup_and_bytes():
    g = _gen(16)
    pool = L.AdapterPool(IN, OUT, RANK, capacity=2)
    bs = [random_packed(OUT, RANK, density=d, generator=g) for d in (0.1, 0.3, 0.05, 0.2)]
    for i, b in enumerate(bs[:3]):
        assert pool.add(f"n{i}", b, seed=i + 1, scale=1.0 + i) == i
    assert pool.capacity == 4 and len(pool) == 3 and "n1" in pool
    assert pool.index("n2") == 2
    e = pool.get("n1")
    assert torch.equal(e.packed.to_dense(), bs[1].to_dense()) and e.seed == 2 and e.scale == 2.0
    want = OUT * 4 + bs[1].nnz * 4 + (spec_chunks := (OUT + 63) // 64 + 1) * 4 + 24
    assert pool.nbytes("n1") == want and spec_chunks == 6
    assert pool.used_nbytes == sum(pool.nbytes(n) for n in pool.names)
    assert pool.total_nbytes >= pool.used_nbytes
    x = torch.randn(3, IN, generator=g)
    ids = pool.ids(["n0", "n1", "n2"])
    y_before = L.batched_sparse_delta(x, ids, pool)
    # remove the middle one: no repack, others keep their slots and results
    values_before = pool.values
    pool.remove("n1")
    assert pool.values is values_before and "n1" not in pool
    assert pool.index("n2") == 2
    y_after = L.batched_sparse_delta(x, torch.tensor([0, 1, 2]), pool)  # slot 1: empty
    assert torch.equal(y_after[[0, 2]], y_before[[0, 2]])
    assert torch.count_nonzero(y_after[1]) == 0
    with pytest.raises(KeyError, match="n1"):
        pool.ids(["n1"])
    # slot reuse, then compaction when the arena's end is full
    assert pool.add("n3", bs[3], seed=9) == 1
    pool.compact()
    assert int(pool.value_starts[0]) == 0
    y3 = L.batched_sparse_delta(x, pool.ids(["n0", "n3", "n2"]), pool)
    assert torch.equal(y3[[0, 2]], y_before[[0, 2]])
    e3 = pool.get("n3")
    torch.testing.assert_close(y3[1], L.sparse_delta(x[1], e3.packed, seed=9, scale=1.0))
    for i in range(20):  # churn: add/remove many times, pool stays consistent
        pool.add(f"t{i}", bs[i % 4], seed=100 + i)
        if i % 3:
            pool.remove(f"t{i}")
    for n in pool.names:
        e = pool.get(n)
        e.packed.validate()
    assert pool.values.numel() < 40 * max(b.nnz for b in bs)


def test_pool_validates_adapters():
    g = _gen(17)
    pool = L.AdapterPool(IN, OUT, RANK)
    with pytest.raises(ValueError, match="rank 16, the pool 32"):
        pool.add("r", random_packed(OUT, 16, generator=g), seed=1)
    with pytest.raises(ValueError, match="out_features=300"):
        pool.add("o", random_packed(300, RANK, generator=g), seed=1)
    b = random_packed(OUT, RANK, generator=g)
    with pytest.raises(ValueError, match="offsets"):
        pool.add("bad", L.PackedB(b.mask, b.values, b.offsets.flip(0), RANK), seed=1)
    with pytest.raises(ValueError, match="seed is required"):
        pool.add("s", b)
    with pytest.raises(ValueError, match="distribution"):
        pool.add("d", b, seed=1, distribution="normal")
    pool.add("ok", b, seed=1)
    with pytest.raises(ValueError, match="already in this pool"):
        pool.add("ok", b, seed=1)
    from lori_kernels.nn import LoRIAdapter
    with pytest.raises(ValueError, match="in_features=100"):
        pool.add("in", LoRIAdapter(100, OUT, rank=RANK, alpha=1.0, seed=3))
    assert len(pool) == 1


def test_pool_from_lori_adapter_and_to():
    from lori_kernels.nn import LoRIAdapter
    g = _gen(18)
    ad = LoRIAdapter(IN, OUT, rank=RANK, alpha=64.0, seed=2**63 + 5, distribution="uniform")
    ad.set_pattern(torch.rand(OUT, RANK, generator=g) < 0.1,
                   torch.randn(OUT, RANK, generator=g))
    pool = L.AdapterPool(IN, OUT, RANK, dtype=torch.bfloat16)
    pool.add("u", ad)
    e = pool.get("u")
    assert e.seed == 2**63 + 5 and e.distribution == "uniform" and e.scale == 2.0
    assert pool.to("cpu") is pool and pool.values.dtype == torch.bfloat16
    pool.to("meta")
    assert pool.device.type == "meta" and pool.seeds.device.type == "meta"


# ---- module -------------------------------------------------------------------------------------

def test_pool_linear_forward_and_ids():
    g = _gen(19)
    torch.manual_seed(0)
    lin = torch.nn.Linear(IN, OUT)
    pool = make_pool(4, seed=20)
    layer = L.LoRIPoolLinear(lin, pool)
    x = torch.randn(2, 5, IN, generator=g)
    with pytest.raises(RuntimeError, match="set_adapter_ids"):
        layer(x)
    layer.set_adapter_ids(["a0", None, "a3", "a3", "a1", "a2", "a2", None, "a0", "a1"])
    y = layer(x)
    ids = torch.tensor([0, -1, 3, 3, 1, 2, 2, -1, 0, 1])
    expect = lin(x) + L.batched_sparse_delta(x, ids, pool)
    torch.testing.assert_close(y, expect)
    layer.set_adapter_ids(["a2", "a0"])  # one per sequence
    y = layer(x)
    torch.testing.assert_close(
        y, lin(x) + L.batched_sparse_delta(x, torch.tensor([2] * 5 + [0] * 5), pool))
    layer.set_adapter_ids(["a2", "a0", "a1"])
    with pytest.raises(ValueError, match="3 adapter ids"):
        layer(x)


def test_pool_linear_rejects_mismatched_pool():
    with pytest.raises(ValueError, match="256 -> 320 but the layer is 256 -> 321"):
        L.LoRIPoolLinear(torch.nn.Linear(IN, OUT + 1), make_pool(1, seed=21))
    with pytest.raises(ValueError, match="in_features=256"):
        L.batched_sparse_delta(torch.randn(2, IN + 1), torch.tensor([0, 0]), make_pool(1, seed=21))


def test_pool_linear_multi_task_training_step():
    g = _gen(22)
    lin = torch.nn.Linear(IN, OUT)
    pool = make_pool(3, seed=23)
    pool.values.requires_grad_()
    layer = L.LoRIPoolLinear(lin, pool)
    opt = torch.optim.SGD([pool.values], lr=0.1)
    layer.set_adapter_ids([0, 1, 2, 0, None, 1])
    x = torch.randn(6, IN, generator=g)
    v0 = pool.values.detach().clone()
    layer(x).square().sum().backward()
    assert lin.weight.grad is None
    for a in range(3):
        s, n = int(pool.value_starts[a]), pool.get(f"a{a}").packed.nnz
        assert torch.count_nonzero(pool.values.grad[s:s + n]) > 0
    opt.step()
    assert not torch.equal(pool.values.detach(), v0)


def test_value_start_overflow_is_rejected():
    # value_start + nnz wrapping past int64 must not pass the range check (review finding).
    from lori_kernels.testing import random_packed
    b = random_packed(40, 8, generator=torch.Generator().manual_seed(0))
    nnz = b.nnz
    args = (torch.randn(2, 16), torch.zeros(2, dtype=torch.int32), b.mask[None], b.values,
            torch.tensor([2**63 - nnz], dtype=torch.int64), b.offsets[None],
            torch.tensor([1], dtype=torch.int64), torch.tensor([1.0]),
            torch.tensor([1], dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="values buffer"):
        torch.ops.lori.batched_sparse_delta(*args)


def test_shared_value_ranges_sum_their_gradients():
    from lori_kernels.testing import random_packed
    b = random_packed(40, 8, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([0, 1, 0, 1], dtype=torch.int32)
    v = b.values.clone().requires_grad_()
    y = torch.ops.lori.batched_sparse_delta(
        x, ids, torch.stack([b.mask, b.mask]), v, torch.tensor([0, 0]),
        torch.stack([b.offsets, b.offsets]), torch.tensor([3, 3]), torch.tensor([1.0, 1.0]),
        torch.tensor([1, 1], dtype=torch.int32), 8)
    y.sum().backward()
    v2 = b.values.clone().requires_grad_()
    torch.ops.lori.sparse_delta(x, b.mask, v2, b.offsets, 8, 3, "rademacher", 1.0).sum().backward()
    torch.testing.assert_close(v.grad, v2.grad)

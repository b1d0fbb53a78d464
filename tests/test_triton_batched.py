"""Triton batched multi-adapter ops (torch.ops.lori.triton_batched_sparse_delta(+_backward))
against a loop of single-adapter C++ sparse_delta calls, the C++ batched op and the float64
reference.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, see conftest),
where every program costs milliseconds: shapes are small (in 40, out 70, rank 16) and the
whole file is budgeted at ~90 s on a 2-core machine.
"""
import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import lori_kernels as L  # noqa: E402
import lori_kernels.triton as LT  # noqa: E402
from lori_kernels import reference  # noqa: E402
from lori_kernels.testing import (check_compile_fullgraph, random_packed,  # noqa: E402
                                   tolerance_bound)

from batched_cases import (BAD_ARGUMENTS, MIXES, check_rule, loop_references,  # noqa: E402
                           make_pool, mix_ids, mutate_arg)

if LT.import_error is not None and not isinstance(LT.import_error, ImportError):
    raise LT.import_error
if not LT.available():
    pytest.skip("Triton kernels cannot run here (no CUDA and not built for TRITON_INTERPRET=1)",
                allow_module_level=True)

from lori_kernels.triton.batched_delta import group_tokens  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IN, OUT, RANK = 40, 70, 16   # out spans two 64-row chunks, not a multiple of 64
_ops = torch.ops.lori


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@functools.lru_cache(maxsize=None)
def _pool64(dtype):
    return make_pool(64, inp=IN, out=OUT, rank=RANK, dtype=dtype, seed=31)


def _dev_args(pool):
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in pool.op_args()]


def _run(x, ids, pool, base=None):
    """The Triton op on DEVICE; result on the CPU."""
    masks, values, *rest = _dev_args(pool)
    if values.dtype != x.dtype:
        values = values.to(x.dtype)
    y = _ops.triton_batched_sparse_delta(x.to(DEVICE), ids.to(DEVICE), masks, values, *rest,
                                         None if base is None else base.to(DEVICE))
    return y.cpu()


# ---- grouping ----------------------------------------------------------------------------------

@pytest.mark.parametrize("block_t", [16, 64])
def test_group_tokens_tables(block_t):
    """Every token with an id lands in exactly one work row of its adapter, rows <= block_t,
    segments sorted and stable; tables sized by host bounds, unused rows marked -2."""
    g = _gen(1)
    ids = mix_ids("zipf64", 300, 10, True, g)
    gr = group_tokens(ids, 10, block_t)
    perm, segs, work = gr.perm.long(), gr.segs.long(), gr.work.long()
    assert segs.shape == (min(300, 11), 3) and work.shape == (-(-300 // block_t) + 11, 3)
    seen = torch.zeros(300, dtype=torch.long)
    for a, p0, n in work.tolist():
        if a == -2:
            continue
        assert 1 <= n <= block_t
        toks = perm[p0:p0 + n]
        assert torch.all(ids[toks] == a)
        assert torch.all(toks[1:] > toks[:-1])  # stable: original order within an adapter
        seen[toks] += 1
    assert torch.equal(seen, torch.ones(300, dtype=torch.long))
    used = [s for s in segs.tolist() if s[0] != -2]
    assert [s[0] for s in used] == sorted(set(ids.tolist()))
    assert sum(s[2] for s in used) == 300
    # ids outside [-1, N) are grouped as -1 (the op rejects them first; never an OOB read)
    bad = group_tokens(torch.tensor([0, 7, -5, 1]), 2, 16)
    assert bad.segs[:, 0].tolist() == [-1, 0, 1] and bad.segs[0, 2] == 2


# ---- forward: popularity mixes -----------------------------------------------------------------

# T = 513 only with -1 ids mixed in: the interpreter spends seconds per such call.
@pytest.mark.parametrize("T,idle", [(0, False), (1, False), (1, True), (7, False), (7, True),
                                    (513, True)])
@pytest.mark.parametrize("mix", MIXES)
def test_forward_mixes(mix, idle, T):
    g = _gen(T * 7 + len(mix) + idle)
    pool = _pool64(torch.float32)
    ids = mix_ids(mix, T, 64, idle, g)
    x = torch.randn(T, IN, generator=g)
    y = _run(x, ids, pool)
    loop, ref, base = loop_references(x, ids, pool)
    check_rule(y, loop, ref, base, f"{mix} idle={idle} T={T}", ids=ids)
    if idle and T:
        assert torch.count_nonzero(y[ids < 0]) == 0
    if T:
        cpp = _ops.batched_sparse_delta(x, ids, *pool.op_args())
        assert (y - cpp).abs().max() <= tolerance_bound(ref, base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_forward_dtypes(dtype):
    g = _gen(2)
    pool = make_pool(8, inp=IN, out=OUT, rank=33, dtype=dtype, seed=32)  # rank 33: two words
    ids = mix_ids("zipf64", 40, 8, True, g)
    x = torch.randn(40, IN, generator=g).to(dtype)
    y = _run(x, ids, pool)
    assert y.dtype == dtype
    loop, ref, base = loop_references(x, ids, pool)
    check_rule(y, loop, ref, base, str(dtype), ids=ids)
    if dtype == torch.float64:
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base_accumulate_3d_and_noncontiguous(dtype):
    g = _gen(3)
    pool = make_pool(5, inp=IN, out=OUT, rank=RANK, dtype=dtype, seed=33)
    x = torch.randn(2, 6, 2 * IN, generator=g).to(dtype)[..., ::2]   # non-contiguous, 3-D
    ids = torch.tensor([0, 1, -1, 4, 4, 2, 3, -1, 0, 0, 1, 2])
    base = torch.randn(2, 6, OUT, generator=g).to(dtype)
    y = _run(x, ids, pool, base)
    delta = _run(x, ids, pool)
    assert y.shape == (2, 6, OUT) and delta.shape == (2, 6, OUT)
    idle = ids < 0
    assert torch.equal(y.reshape(-1, OUT)[idle], base.reshape(-1, OUT)[idle])
    assert torch.count_nonzero(delta.reshape(-1, OUT)[idle]) == 0
    # base + delta rounded once: within the rule of the exact sum
    _, ref, bl = loop_references(x.reshape(-1, IN), ids, pool)
    exact = base.reshape(-1, OUT).double() + ref
    assert (y.reshape(-1, OUT).double() - exact).abs().max() <= tolerance_bound(
        exact, base.reshape(-1, OUT) + bl)
    cpp = _ops.batched_sparse_delta(x, ids, *pool.op_args(), base)
    torch.testing.assert_close(y, cpp, **({} if dtype == torch.float32 else
                                          dict(rtol=2 ** -7, atol=2 ** -7)))


def test_deterministic():
    g = _gen(4)
    pool = _pool64(torch.float32)
    ids = mix_ids("zipf64", 40, 64, True, g)
    x = torch.randn(40, IN, generator=g)
    assert torch.equal(_run(x, ids, pool), _run(x, ids, pool))


# ---- backward ----------------------------------------------------------------------------------

def _dense_b(pool, a, v):
    e = pool.get(pool._names[a])
    start = int(pool.value_starts[a])
    return torch.zeros(pool.out_features, pool.rank, dtype=v.dtype).masked_scatter(
        e.packed.bool_mask(), v[start:start + e.packed.nnz]), e


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_multi_task_against_reference(dtype):
    """grad_x, grad of every used adapter's values and of base vs float64 autograd."""
    g = _gen(5)
    pool = make_pool(5, inp=IN, out=OUT, rank=33, dtype=dtype, seed=34)
    ids = torch.tensor([0, 1, 1, -1, 3, 0, 1, 3, 3, 0] + [0] * 20 + [1, -1])
    T = ids.numel()
    masks, values, *rest = _dev_args(pool)
    x = torch.randn(T, IN, generator=g).to(dtype).to(DEVICE).requires_grad_()
    v = values.clone().requires_grad_()
    base = torch.randn(T, OUT, generator=g).to(dtype).to(DEVICE).requires_grad_()
    y = _ops.triton_batched_sparse_delta(x, ids.to(DEVICE), masks, v, *rest, base)
    gy = torch.randn(T, OUT, generator=g).to(dtype)
    y.backward(gy.to(DEVICE))
    assert torch.equal(base.grad.cpu(), gy)
    x64 = x.detach().cpu().double().requires_grad_()
    v64 = values.detach().cpu().double().requires_grad_()
    xd = x.detach().cpu().clone().requires_grad_()
    vd = values.detach().cpu().clone().requires_grad_()
    y64 = torch.zeros(T, OUT, dtype=torch.float64)
    yd = torch.zeros(T, OUT, dtype=dtype)
    for a in (0, 1, 3):
        sel = (ids == a).nonzero().flatten()
        d64, e = _dense_b(pool, a, v64)
        dd, _ = _dense_b(pool, a, vd)
        a64 = reference.random_a(e.seed, pool.rank, IN, e.distribution).double()
        y64 = y64.index_add(0, sel, (x64[sel] @ a64.T) @ d64.T * e.scale)
        yd = yd.index_add(0, sel, reference.dense_lora(xd[sel], a64.to(dtype), dd, e.scale))
    y64.backward(gy.double())
    yd.backward(gy)
    for got, r, b, what in [(x.grad, x64.grad, xd.grad, "grad_x"),
                            (v.grad, v64.grad, vd.grad, "grad_values")]:
        err = (got.cpu().double() - r).abs().max().item()
        bound = tolerance_bound(r, b)
        assert err <= bound, f"{what}: {err:.3e} > {bound:.3e}"
    for a in (2, 4):   # unused adapters get exactly zero
        s, n = int(pool.value_starts[a]), pool.get(f"a{a}").packed.nnz
        assert torch.count_nonzero(v.grad[s:s + n]) == 0
    assert torch.count_nonzero(x.grad[ids.to(DEVICE) < 0]) == 0
    gx, gv = _ops.batched_sparse_delta_backward(gy, x.detach().cpu(), ids, *pool.op_args(),
                                                True, True)
    assert (x.grad.cpu() - gx).abs().max() <= tolerance_bound(x64.grad, xd.grad)
    assert (v.grad.cpu() - gv).abs().max() <= tolerance_bound(v64.grad, vd.grad)


def test_backward_long_segment_and_needs_input_grad():
    # 150 tokens of one adapter: several token tiles summed in the gv kernel's loop.
    g = _gen(6)
    pool = make_pool(3, inp=IN, out=OUT, rank=RANK, seed=35)
    ids = torch.cat([torch.full((150,), 2), torch.tensor([0, -1, 1])])
    x = torch.randn(153, IN, generator=g)
    gy = torch.randn(153, OUT, generator=g)
    args = (gy.to(DEVICE), x.to(DEVICE), ids.to(DEVICE), *_dev_args(pool))
    gx, gv = _ops.triton_batched_sparse_delta_backward(*args, True, True)
    cx, cv = _ops.batched_sparse_delta_backward(gy, x, ids, *pool.op_args(), True, True)
    torch.testing.assert_close(gx.cpu(), cx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gv.cpu(), cv, rtol=1e-4, atol=1e-4)
    gx2, gv2 = _ops.triton_batched_sparse_delta_backward(*args, True, False)
    assert torch.equal(gx2, gx) and gv2.numel() == 0
    gx3, gv3 = _ops.triton_batched_sparse_delta_backward(*args, False, True)
    assert gx3.numel() == 0 and torch.equal(gv3, gv)
    masks, values, *rest = _dev_args(pool)
    xr = x.to(DEVICE).requires_grad_()
    _ops.triton_batched_sparse_delta(xr, ids.to(DEVICE), masks, values, *rest).sum().backward()
    assert xr.grad is not None and values.grad is None


def test_empty_batch_backward():
    pool = make_pool(2, inp=IN, out=OUT, rank=RANK, seed=36)
    masks, values, *rest = _dev_args(pool)
    v = values.clone().requires_grad_()
    x = torch.randn(0, IN, device=DEVICE, requires_grad=True)
    y = _ops.triton_batched_sparse_delta(x, torch.zeros(0, dtype=torch.int32, device=DEVICE),
                                         masks, v, *rest)
    assert y.shape == (0, OUT)
    y.sum().backward()
    assert x.grad.shape == (0, IN) and torch.count_nonzero(v.grad) == 0


def test_shared_value_ranges_sum_their_gradients():
    b = random_packed(40, 8, generator=_gen(7))
    x = torch.randn(4, 16, generator=_gen(8), device="cpu").to(DEVICE)
    ids = torch.tensor([0, 1, 0, 1], dtype=torch.int32, device=DEVICE)
    v = b.values.clone().to(DEVICE).requires_grad_()
    t = lambda *a, **k: torch.tensor(*a, **k).to(DEVICE)  # noqa: E731
    y = _ops.triton_batched_sparse_delta(
        x, ids, torch.stack([b.mask, b.mask]).to(DEVICE), v, t([0, 0]),
        torch.stack([b.offsets, b.offsets]).to(DEVICE), t([3, 3]), t([1.0, 1.0]),
        t([1, 1], dtype=torch.int32), 8)
    y.sum().backward()
    v2 = b.values.clone().requires_grad_()
    _ops.sparse_delta(x.cpu(), b.mask, v2, b.offsets, 8, 3, "rademacher", 1.0).sum().backward()
    torch.testing.assert_close(v.grad.cpu(), v2.grad)


def test_gradcheck_float64():
    # Tiny and fast_mode (random projections of the Jacobian): the full Jacobian costs one
    # interpreted call per input and per output element (~15 s even at this size).
    # base's gradient is grad_y itself (test_backward_multi_task_against_reference).
    g = _gen(9)
    pool = L.AdapterPool(7, 5, 3, dtype=torch.float64)
    for i, dist in enumerate(("rademacher", "uniform")):
        pool.add(f"a{i}", random_packed(5, 3, density=0.5, generator=g, dtype=torch.float64),
                 seed=37 + i, distribution=dist, scale=0.5 + i)
    masks, values, starts, offsets, seeds, scales, dists, rank = _dev_args(pool)
    ids = torch.tensor([1, -1, 0, 1], device=DEVICE)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    v = values.clone().requires_grad_()
    base = torch.randn(4, 5, generator=g, dtype=torch.float64).to(DEVICE)
    assert v.numel() >= 4   # both adapters have entries to check
    torch.autograd.gradcheck(
        lambda x, v: _ops.triton_batched_sparse_delta(x, ids, masks, v, starts, offsets, seeds,
                                                      scales, dists, rank, base),
        (x, v), fast_mode=True)


# ---- op machinery ------------------------------------------------------------------------------

def test_opcheck():
    g = _gen(10)
    pool = make_pool(4, inp=IN, out=OUT, rank=33, seed=38)
    masks, values, *rest = _dev_args(pool)
    ids = torch.tensor([1, -1, 3, 1, 0], device=DEVICE)
    x = torch.randn(5, IN, generator=g).to(DEVICE).requires_grad_()
    base = torch.randn(5, OUT, generator=g).to(DEVICE)
    v = values.clone().requires_grad_()
    torch.library.opcheck(_ops.triton_batched_sparse_delta.default,
                          (x, ids, masks, v, *rest, base))
    gy = torch.randn(5, OUT, generator=g).to(DEVICE)
    torch.library.opcheck(_ops.triton_batched_sparse_delta_backward.default,
                          (gy, x.detach(), ids, masks, values, *rest, True, True))


def test_torch_compile_fullgraph():
    g = _gen(11)
    pool = make_pool(4, inp=IN, out=64, rank=RANK, seed=39)
    masks, values, starts, offsets, seeds, scales, dists, rank = _dev_args(pool)
    ids = torch.tensor([3, 0, 0, -1, 2], device=DEVICE)

    def f(x, v):
        y = _ops.triton_batched_sparse_delta(x, ids, masks, v, starts, offsets, seeds, scales,
                                             dists, rank)
        return torch.nn.functional.gelu(y).sum()

    check_compile_fullgraph(f, torch.randn(5, IN, generator=g).to(DEVICE), values.clone())


# ---- bad input: the C++ op's errors, never an out-of-bounds read -------------------------------

def _op_args(pool, T=4):
    x = torch.randn(T, pool.in_features, generator=_gen(0)).to(DEVICE)
    return [x, torch.zeros(T, dtype=torch.int32, device=DEVICE), *_dev_args(pool)]


def _both(a, exc, msg):
    """Forward and backward raise the same clear error."""
    with pytest.raises(exc, match=msg):
        _ops.triton_batched_sparse_delta(*a)
    gy = torch.ones(a[0].shape[0] if a[0].dim() else 1, a[2].shape[1] if a[2].dim() == 3 else OUT,
                    device=DEVICE, dtype=a[0].dtype if a[0].is_floating_point() else torch.float32)
    with pytest.raises(exc, match=msg):
        _ops.triton_batched_sparse_delta_backward(gy, *a, True, True)


@pytest.mark.parametrize("bad_id", [4, 1000, -2])
def test_adapter_id_out_of_range(bad_id):
    a = _op_args(make_pool(4, inp=IN, out=OUT, rank=RANK, seed=40))
    a[1] = torch.tensor([0, bad_id, 1, 2], dtype=torch.int32, device=DEVICE)
    _both(a, ValueError, f"adapter_ids\\[1\\] = {bad_id} is out of range for a pool of 4")


@pytest.mark.parametrize("mutate,exc,msg", [
    (mutate_arg(0, lambda t: t.to(torch.int32)), TypeError, "x must be float"),
    *BAD_ARGUMENTS,
    (mutate_arg(3, lambda t: t.to("meta")), RuntimeError, "values is on meta"),
])
def test_bad_arguments_raise_clear_errors(mutate, exc, msg):
    a = _op_args(make_pool(3, inp=IN, out=OUT, rank=RANK, seed=41))
    mutate(a)
    _both(a, exc, msg)


def test_bad_base_and_grad_y():
    a = _op_args(make_pool(2, inp=IN, out=OUT, rank=RANK, seed=42))
    with pytest.raises(ValueError, match="base must have shape"):
        _ops.triton_batched_sparse_delta(*a, torch.zeros(4, OUT + 1, device=DEVICE))
    with pytest.raises(TypeError, match="base dtype"):
        _ops.triton_batched_sparse_delta(*a, torch.zeros(4, OUT, device=DEVICE,
                                                         dtype=torch.float64))
    with pytest.raises(ValueError, match="grad_y must have shape"):
        _ops.triton_batched_sparse_delta_backward(torch.zeros(3, OUT, device=DEVICE), *a, True,
                                                  True)


@pytest.mark.skipif(DEVICE != "cpu", reason="bitmask contents are validated on the host for CPU")
def test_corrupt_pool_is_caught():
    pool = make_pool(3, inp=IN, out=OUT, rank=RANK, seed=43)
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
        a = [torch.randn(3, IN), torch.tensor([0, 1, 1]), masks, values, starts, offsets, seeds,
             scales, dists, rank]
        _both(a, ValueError, "adapter 1")
        a[1] = torch.tensor([0, 2, -1])   # the corrupt adapter unused: runs
        _ops.triton_batched_sparse_delta(*a)


@pytest.mark.skipif(DEVICE != "cpu", reason="the meta device stands in for a wrong device here")
def test_skipped_checks_still_never_read_out_of_bounds(monkeypatch):
    """Validation off (no sync): bad ids act as -1, extents are clamped."""
    L.set_validation("off")
    pool = make_pool(3, inp=IN, out=OUT, rank=RANK, seed=44)
    x = torch.randn(4, IN, generator=_gen(12))
    masks, values, starts, *rest = pool.op_args()
    y = _ops.triton_batched_sparse_delta(x, torch.tensor([0, 99, -7, 2]), masks, values, starts,
                                         *rest)
    assert torch.count_nonzero(y[1:3]) == 0
    good = _ops.triton_batched_sparse_delta(x, torch.tensor([0, -1, -1, 2]), masks, values,
                                            starts, *rest)
    assert torch.equal(y, good)
    # an extent past the buffer's end: reads clamped to the buffer (a view with no spare room)
    short = values[: int(starts[2])]
    y = _ops.triton_batched_sparse_delta(x, torch.tensor([0, 2, 2, 2]), masks, short, starts,
                                         *rest)
    assert torch.equal(y[0], good[0]) and torch.count_nonzero(y[1:]) == 0  # adapter 2: empty


# ---- pool and module ---------------------------------------------------------------------------

def test_pool_and_pool_linear_with_triton_backend(monkeypatch):
    g = _gen(13)
    pool = make_pool(4, inp=IN, out=OUT, rank=RANK, seed=45).to(DEVICE)
    x = torch.randn(2, 5, IN, generator=g).to(DEVICE)
    names = ["a0", None, "a3", "a3", "a1", "a2", "a2", None, "a0", "a1"]
    y = L.batched_sparse_delta(x, names, pool, backend="triton")
    torch.testing.assert_close(y, L.batched_sparse_delta(x, names, pool, backend="cpp"),
                               rtol=1e-5, atol=1e-5)
    lin = torch.nn.Linear(IN, OUT).to(DEVICE)
    layer = L.LoRIPoolLinear(lin, pool, backend="triton")
    layer.set_adapter_ids(names)
    torch.testing.assert_close(layer(x), lin(x) + y)
    # The process-wide backend picks the Triton op too; a training step reaches every used
    # adapter
    L.set_backend("triton")
    pool.values.requires_grad_()
    layer = L.LoRIPoolLinear(lin, pool)
    layer.set_adapter_ids(["a2", "a0"])  # one per sequence
    layer(x).square().sum().backward()
    for a in (0, 2):
        s, n = int(pool.value_starts[a]), pool.get(f"a{a}").packed.nnz
        assert torch.count_nonzero(pool.values.grad[s:s + n]) > 0
    for a in (1, 3):
        s, n = int(pool.value_starts[a]), pool.get(f"a{a}").packed.nnz
        assert torch.count_nonzero(pool.values.grad[s:s + n]) == 0

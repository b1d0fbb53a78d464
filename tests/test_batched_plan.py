"""The batched ops' plan argument (plan_order, plan_starts, plan_adapters: the tokens grouped by
adapter once per step, AdapterPool.plan / PoolPlan.op_inputs) on every backend here: the C++
CPU op (the plan path equals the no-plan path bit for bit) and the Triton op under the
interpreter (within the tolerance rule). A plan that disagrees with the ids raises under
validation "full"; the data-free rules check its shapes and dtypes always.
"""
import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lori_kernels as L  # noqa: E402
from lori_kernels import reference  # noqa: E402
from lori_kernels import ops as lops  # noqa: E402
from lori_kernels.nn import use_plan  # noqa: E402
from lori_kernels.testing import random_packed  # noqa: E402
from lori_kernels.validation import validation  # noqa: E402

from batched_cases import check_rule, loop_references, make_pool, mix_ids  # noqa: E402


def _triton_ok():
    try:
        import lori_kernels.triton as LT
    except ImportError:
        return False
    return LT.available() and not torch.cuda.is_available()  # CPU tensors: the interpreter


_ops = torch.ops.lori
BACKENDS = [
    pytest.param("cpp", id="cpp"),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        not _triton_ok(), reason="Triton kernels cannot run on CPU tensors here "
                                 "(needs triton and TRITON_INTERPRET=1)")),
]


def _fwd(backend):
    return _ops.batched_sparse_delta if backend == "cpp" else _ops.triton_batched_sparse_delta


def _bwd(backend):
    return (_ops.batched_sparse_delta_backward if backend == "cpp"
            else _ops.triton_batched_sparse_delta_backward)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# The interpreter costs milliseconds per program: Triton gets the small shapes.
SHAPES = {"cpp": (45, 70, 33), "triton": (40, 70, 16)}


@functools.lru_cache(maxsize=None)
def _pool(backend, n, dtype=torch.float32):
    inp, out, rank = SHAPES[backend]
    return make_pool(n, inp=inp, out=out, rank=rank, dtype=dtype, seed=5 + n)


def _plan(ids):
    return reference.batched_plan(ids)


# ---- the plan's form -------------------------------------------------------------------------

def test_reference_plan_form():
    ids = torch.tensor([2, -1, 0, 2, 2, -1, 0])
    order, starts, adapters = _plan(ids)
    assert order.dtype == starts.dtype == adapters.dtype == torch.int32
    assert order.tolist() == [1, 5, 2, 6, 0, 3, 4]        # stable, -1 first
    assert starts.tolist() == [0, 2, 4, 7]
    assert adapters.tolist() == [-1, 0, 2]
    o, s, a = _plan(torch.zeros(0, dtype=torch.long))
    assert o.numel() == 0 and s.tolist() == [0] and a.numel() == 0


def test_pool_plan_op_inputs_one_buffer_cached_and_per_sequence():
    pool = _pool("cpp", 4)
    plan = pool.plan(["a1", None, "a3"])
    x = torch.randn(3, 5, SHAPES["cpp"][0])            # one id per sequence of 5 tokens
    ids, (order, starts, adapters) = plan.op_inputs(x, pool.snapshot())
    assert ids.tolist() == [1] * 5 + [-1] * 5 + [3] * 5
    ref = _plan(ids)
    assert all(torch.equal(p, r) for p, r in zip((order, starts, adapters), ref))
    # ids and the plan share one buffer (one host-to-device copy per step), cached per shape
    assert ids.untyped_storage().data_ptr() == order.untyped_storage().data_ptr()
    again = plan.op_inputs(x, pool.snapshot())
    assert again[0] is ids and again[1][0] is order
    with pytest.raises(ValueError, match="one per token"):
        plan.op_inputs(torch.randn(4, SHAPES["cpp"][0]))


def test_hand_built_pool_plan_ids_are_bounded():
    """A PoolPlan made by hand is not validated like pool.plan's: the ids it hands the op (which
    trusts the plan) are still bounded by the pool's slot count."""
    pool = _pool("cpp", 4)
    snap = pool.snapshot()
    x = torch.randn(2, SHAPES["cpp"][0])
    for bad in (snap.capacity, -2):
        plan = L.PoolPlan(torch.tensor([0, bad], dtype=torch.int32), {pool.key: snap},
                          single=snap)
        with pytest.raises(ValueError, match="not a slot of this pool"):
            L.batched_sparse_delta(x, plan.ids, plan)


# ---- plan path == no-plan path ----------------------------------------------------------------

CASES = [  # (T, mix, idle)
    (0, "distinct", False), (1, "identical", False), (7, "distinct", True),
    (33, "uniform8", True), (33, "identical", True), (130, "zipf64", False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,mix,idle", CASES)
def test_plan_equals_no_plan(backend, T, mix, idle):
    if backend == "triton" and T > 33:
        pytest.skip("interpreter budget: the Triton op runs the shorter cases")
    n = 64 if mix == "zipf64" else 9
    pool = _pool(backend, n)
    g = _gen(T + n)
    ids = mix_ids(mix, T, n, idle, g)
    x = torch.randn(T, SHAPES[backend][0], generator=g)
    base = torch.randn(T, SHAPES[backend][1], generator=g)
    args = pool.op_args()
    plan = _plan(ids)
    y0 = _fwd(backend)(x, ids, *args, None)
    y1 = _fwd(backend)(x, ids, *args, None, *plan)
    yb0 = _fwd(backend)(x, ids, *args, base)
    yb1 = _fwd(backend)(x, ids, *args, base, *plan)
    gy = torch.randn(T, SHAPES[backend][1], generator=g)
    g0 = _bwd(backend)(gy, x, ids, *args, True, True)
    g1 = _bwd(backend)(gy, x, ids, *args, True, True, *plan)
    if backend == "cpp":
        assert torch.equal(y0, y1) and torch.equal(yb0, yb1)
        assert torch.equal(g0[0], g1[0]) and torch.equal(g0[1], g1[1])
    else:
        # other tile tables (G groups, not min(T, N + 1)) may split the K sums differently
        loop, ref, bl = loop_references(x, ids, pool)
        check_rule(y1, loop, ref, bl, "plan", ids=ids)
        check_rule(yb1 - base, loop, ref, bl, "plan+base", ids=ids)
        assert torch.equal(y1[ids < 0], torch.zeros_like(y1[ids < 0]))
        for a, b in zip(g0, g1):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_plan_equals_no_plan_dtypes_3d_noncontiguous(dtype):
    """C++ op: other dtypes (generic path for float64), x 3-D and a non-contiguous slice."""
    pool = _pool("cpp", 6, dtype)
    inp, out, _ = SHAPES["cpp"]
    g = _gen(3)
    xb = torch.randn(2, 9, 2 * inp, generator=g).to(dtype)
    x = xb[..., ::2]
    ids = torch.tensor([5, 5, -1, 0, 3, 3, 3, 0, -1] * 2)
    plan = _plan(ids)
    base = torch.randn(2, 9, out, generator=g).to(dtype)
    args = pool.op_args()
    for b in (None, base):
        assert torch.equal(_fwd("cpp")(x, ids, *args, b), _fwd("cpp")(x, ids, *args, b, *plan))


@pytest.mark.parametrize("backend", BACKENDS)
def test_removed_and_stale_ids_follow_the_pool(backend):
    """A plan made before remove() keeps reading the removed adapter (pool module doc), with
    and without the plan argument alike; plans made after it refuse the name / stale SlotId."""
    inp, out, rank = SHAPES[backend]
    pool = make_pool(4, inp=inp, out=out, rank=rank, seed=21)
    sid = pool.index("a2")
    plan = pool.plan(["a2", None, "a0", "a2"])
    x = torch.randn(4, inp, generator=_gen(4))
    layer = L.LoRIPoolLinear(torch.nn.Linear(inp, out), pool, backend=backend)
    before = layer(x, plan=plan)
    pool.remove("a2")
    after = layer(x, plan=plan)
    snap_args = plan.op_args()
    ids = plan.ids
    expect = _fwd(backend)(x, ids, *snap_args, layer.base(x))
    if backend == "cpp":
        assert torch.equal(after, before) and torch.equal(after, expect)
    else:
        torch.testing.assert_close(after, expect, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    with pytest.raises(KeyError):
        pool.plan(["a2"])
    del plan, snap_args, ids  # the last holders of the old snapshot: slot 2 is reclaimed
    pool.add("new", make_pool(1, inp=inp, out=out, rank=rank, seed=22).get("a0").packed,
             seed=9, slot=int(sid))
    with pytest.raises(ValueError, match="stale"):
        pool.plan([sid])


# ---- the layers hand the plan to the op -------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_pool_linear_and_use_plan_pass_the_plan(backend, monkeypatch):
    inp, out, rank = SHAPES[backend]
    pool = make_pool(5, inp=inp, out=out, rank=rank, seed=23)
    layers = [L.LoRIPoolLinear(torch.nn.Linear(inp, out), pool, backend=backend)
              for _ in range(3)]
    x = torch.randn(2, 3, inp, generator=_gen(5))
    plan = pool.plan(["a4", "a1"])                       # one per sequence
    calls = []
    real = dict(lops._BATCHED)

    def spy(key):
        def f(*args):
            calls.append(len(args))
            return real[key](*args)
        return f
    monkeypatch.setitem(lops._BATCHED, backend, spy(backend))
    with use_plan(plan):
        ys = [lay(x) for lay in layers]
    assert calls == [14] * 3                             # base and the three plan tensors
    ids = plan.token_ids(x)
    want = [_fwd(backend)(x, ids, *pool.op_args(), lay.base(x)) for lay in layers]
    for y, w in zip(ys, want):
        torch.testing.assert_close(y, w, rtol=0 if backend == "cpp" else 1e-5,
                                   atol=0 if backend == "cpp" else 1e-5)
    # the plan tensors were built once for the step, not per layer
    assert len(plan._inputs) == 1


# ---- a wrong plan raises under "full" ----------------------------------------------------------

def _bad_plans(ids):
    """(name, (order, starts, adapters)) plans that disagree with ids = [2, -1, 0, 2, 2, 0]."""
    o, s, a = _plan(ids)       # order [1, 2, 5, 0, 3, 4], starts [0, 1, 3, 6], adapters [-1, 0, 2]
    swap = o.clone()
    swap[[1, 3]] = swap[[3, 1]]                          # a permutation, tokens in wrong groups
    unstable = o.clone()
    unstable[[1, 2]] = unstable[[2, 1]]                  # right groups, not a stable order
    dup = o.clone()
    dup[4] = dup[3]
    oob = o.clone()
    oob[0] = 6
    nonmono = s.clone()
    nonmono[1:3] = torch.tensor([3, 1], dtype=torch.int32)
    short = s.clone()
    short[-1] = 5
    empty_group = torch.tensor([0, 1, 1, 6], dtype=torch.int32)
    ad_oob = a.clone()
    ad_oob[2] = 9
    ad_dec = torch.tensor([-1, 2, 0], dtype=torch.int32)
    return [
        ("swap", (swap, s, a), "does not match adapter_ids"),
        ("unstable", (unstable, s, a), "not a stable sort"),
        ("duplicate", (dup, s, a), "not a permutation"),
        ("order_out_of_range", (oob, s, a), "not a permutation|not a token index"),
        ("starts_not_monotone", (o, nonmono, a), "strictly increasing"),
        ("starts_short", (o, short, a), "from 0 to the token count"),
        ("empty_group", (o, empty_group, a), "strictly increasing"),
        ("adapter_out_of_range", (o, s, ad_oob), "out of range"),
        ("adapters_not_increasing", (o, s, ad_dec), "strictly increasing|does not match"),
        ("adapters_wrong", (o, s, torch.tensor([-1, 1, 2], dtype=torch.int32)),
         "does not match adapter_ids"),
    ]


BAD_IDS = torch.tensor([2, -1, 0, 2, 2, 0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(_bad_plans(BAD_IDS))),
                         ids=[c[0] for c in _bad_plans(BAD_IDS)])
def test_wrong_plan_raises_under_full(backend, case):
    _, plan, msg = _bad_plans(BAD_IDS)[case]
    pool = _pool(backend, 4)
    inp, out, _ = SHAPES[backend]
    x = torch.randn(6, inp, generator=_gen(6))
    gy = torch.randn(6, out, generator=_gen(7))
    with validation("full"):
        with pytest.raises(ValueError, match=msg):
            _fwd(backend)(x, BAD_IDS, *pool.op_args(), None, *plan)
        with pytest.raises(ValueError, match=msg):
            _bwd(backend)(gy, x, BAD_IDS, *pool.op_args(), True, True, *plan)
        # the right plan passes the same checks
        _fwd(backend)(x, BAD_IDS, *pool.op_args(), None, *_plan(BAD_IDS))


def test_full_checks_ids_with_a_plan():
    pool = _pool("cpp", 4)
    ids = torch.tensor([0, 7])
    x = torch.randn(2, SHAPES["cpp"][0])
    with validation("full"), pytest.raises(ValueError, match=r"adapter_ids\[1\] = 7"):
        _fwd("cpp")(x, ids, *pool.op_args(), None, *_plan(ids))


@pytest.mark.parametrize("name", ["order_out_of_range", "starts_not_monotone", "starts_short",
                                  "empty_group", "adapter_out_of_range"])
def test_cpu_plan_bounds_checked_under_on(name):
    """Validation "on" trusts the plan's grouping, but the C++ CPU kernels index x and y by it:
    its bounds are always checked there."""
    plan, msg = next((p, m) for n, p, m in _bad_plans(BAD_IDS) if n == name)
    pool = _pool("cpp", 4)
    x = torch.randn(6, SHAPES["cpp"][0])
    with validation("on"), pytest.raises(ValueError, match=msg):
        _fwd("cpp")(x, BAD_IDS, *pool.op_args(), None, *plan)


# ---- data-free rules -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("meta", id="fake")])
def test_plan_rules(backend):
    pool = _pool("cpp" if backend == "meta" else backend, 4)
    inp = SHAPES["cpp" if backend == "meta" else backend][0]
    ids = torch.tensor([0, 1, -1])
    x = torch.randn(3, inp)
    args = list(pool.op_args())
    op = _fwd("cpp" if backend == "meta" else backend)
    plan = _plan(ids)
    if backend == "meta":  # the fake kernel (torch.compile, opcheck, meta tensors)
        x, ids = x.to("meta"), ids.to("meta")
        args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    o, s, a = (t.to(x.device) for t in plan)
    cases = [
        ((o, None, None), ValueError, "go together"),
        ((o.long(), s, a), TypeError, "plan_order must be int32"),
        ((o, s.long(), a), TypeError, "plan_starts must be int32"),
        ((o, s, a.long()), TypeError, "plan_adapters must be int32"),
        ((o[:2], s, a), ValueError, r"plan_order must have shape \(3,\)"),
        ((o, s[:-1], a), ValueError, r"plan_starts must have shape \(4,\)"),
        ((o, s, a.view(1, 3)), ValueError, "plan_adapters must be 1-D"),
    ]
    for plan, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            op(x, ids, *args, None, *plan)
    if backend == "cpp":
        with pytest.raises((ValueError, RuntimeError), match="plan_order is on meta"):
            op(x, ids, *args, None, o.to("meta"), s, a)


# ---- op machinery -----------------------------------------------------------------------------

def test_opcheck_with_plan():
    g = _gen(12)
    for dtype in (torch.float32, torch.float64):
        pool = make_pool(4, inp=45, out=70, rank=33, dtype=dtype, seed=10)
        for ids in (torch.tensor([1, -1, 3, 1, 0]), torch.tensor([2] * 20 + [-1, 0])):
            T = ids.numel()
            plan = _plan(ids)
            x = torch.randn(T, 45, generator=g).to(dtype)
            args = (x, ids, *pool.op_args())
            base = torch.randn(T, 70, generator=g).to(dtype)
            torch.library.opcheck(_ops.batched_sparse_delta.default, (*args, base, *plan))
            torch.library.opcheck(_ops.batched_sparse_delta.default, (*args, None, *plan))
            gy = torch.randn(T, 70, generator=g).to(dtype)
            torch.library.opcheck(_ops.batched_sparse_delta_backward.default,
                                  (gy, *args, True, True, *plan))
        masks, values, *rest = pool.op_args()
        ids = torch.tensor([0, 1, 2, 3, -1])
        xg = torch.randn(5, 45, generator=g).to(dtype).requires_grad_()
        torch.library.opcheck(_ops.batched_sparse_delta.default,
                              (xg, ids, masks, values.clone().requires_grad_(), *rest, None,
                               *_plan(ids)))


def test_gradcheck_float64_with_plan():
    g = _gen(11)
    pool = make_pool(3, inp=13, out=66, rank=5, dtype=torch.float64, seed=9)
    ids = torch.tensor([2, 0, -1, 2, 1, 0, 2])
    plan = _plan(ids)
    x = torch.randn(7, 13, generator=g, dtype=torch.float64, requires_grad=True)
    v = pool.values.detach().clone().requires_grad_()
    base = torch.randn(7, 66, generator=g, dtype=torch.float64, requires_grad=True)
    masks, _, starts, offsets, seeds, scales, dists, rank = pool.op_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with validation("full"):  # every backward call checks the plan it was handed
            torch.autograd.gradcheck(
                lambda x, v, b: _ops.batched_sparse_delta(
                    x, ids, masks, v, starts, offsets, seeds, scales, dists, rank, b, *plan),
                (x, v, base))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_hands_the_plan_to_the_backward(backend):
    """A wrong plan given to the forward must reach the backward: under "full" the backward
    raises too (the forward is run under "on", where the plan is trusted)."""
    pool = _pool(backend, 4)
    inp = SHAPES[backend][0]
    ids = torch.tensor([2, -1, 0, 2])
    o, s, a = _plan(ids)
    bad = (o, s, torch.tensor([-1, 0, 3], dtype=torch.int32))   # group of adapter 2 says 3
    x = torch.randn(4, inp, requires_grad=True)
    y = _fwd(backend)(x, ids, *pool.op_args(), None, *bad)
    with validation("full"), pytest.raises(ValueError, match="does not match adapter_ids"):
        y.sum().backward()
    x.grad = None
    y = _fwd(backend)(x, ids, *pool.op_args(), None, o, s, a)
    y.sum().backward()
    xr = x.detach().clone().requires_grad_()
    _fwd(backend)(xr, ids, *pool.op_args(), None).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=0 if backend == "cpp" else 1e-5,
                               atol=0 if backend == "cpp" else 1e-5)


def test_serving_model_plans_once_per_step(monkeypatch):
    """ServingModel: one plan per step, its tensors built once and shared by every layer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Linear(40, 24))
    sm = L.ServingModel(model, ["0", "1"], rank=8)
    src = {}
    g = _gen(8)
    for name, lay in (("0", model[0]), ("1", model[1])):
        b = random_packed(lay.out_features, 8, density=0.3, generator=g)
        src[name] = dict(b=b, seed=17, distribution="rademacher", scale=2.0)
    slot = sm.add_adapter("t", src)
    built = []
    real = L.PoolPlan.op_inputs

    def count(self, x, snapshot=None):
        out = real(self, x, snapshot)
        built.append(id(out[1][0]))
        return out
    monkeypatch.setattr(L.PoolPlan, "op_inputs", count)
    x = torch.randn(3, 24, generator=g)
    with validation("full"):
        y = sm(x, adapter_names=["t", None, "t"])
    assert len(built) == 2 and built[0] == built[1]       # two layers, one plan tensor
    for lay in sm.layers.values():                        # the same ids, no plan: the op groups
        lay.set_adapter_ids(torch.tensor([slot, -1, slot]))
    assert torch.equal(y, sm.model(x))

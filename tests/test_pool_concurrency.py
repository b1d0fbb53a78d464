"""AdapterPool under change while it serves: snapshots, all-or-nothing add, remove / compact /
growth with plans held, stale ids, and a stress test of reader and writer threads."""
import os
import random
import threading
import time

import pytest
import torch

import lori_kernels as L
from lori_kernels import reference
from lori_kernels.pool import SlotId
from lori_kernels.testing import random_packed, tolerance_bound

IN, OUT, RANK = 96, 136, 8   # out not a multiple of 64: a partial last chunk
K = 10                       # distinct adapter contents


def _contents(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [dict(b=random_packed(OUT, RANK, density=0.1 + 0.08 * k, generator=g),
                 seed=1000 + 7 * k, distribution=("rademacher", "uniform")[k % 2],
                 scale=0.5 + 0.25 * k) for k in range(K)]


CONTENTS = _contents()
X = torch.randn(24, IN, generator=torch.Generator().manual_seed(1))


def _refs():
    """Per content: float64 delta on every row of X, and the tolerance bound for it."""
    out = []
    for c in CONTENTS:
        b = c["b"]
        a64 = reference.random_a(c["seed"], RANK, IN, c["distribution"]).double()
        ref = (X.double() @ a64.T) @ b.to_dense().double().T * c["scale"]
        a32 = reference.random_a(c["seed"], RANK, IN, c["distribution"])
        base = (X @ a32.T) @ b.to_dense().T * c["scale"]
        out.append((ref, tolerance_bound(ref, base)))
    return out


REFS = _refs()


def _add(pool, name, k):
    c = CONTENTS[k]
    return pool.add(name, c["b"], seed=c["seed"], distribution=c["distribution"],
                    scale=c["scale"])


def _content_of(name):
    return int(name.split("_")[0][1:])


def _check_read(y, names):
    """y's rows against the references of the adapters the plan named (None: 0 exactly)."""
    for t, n in enumerate(names):
        if n is None:
            assert torch.count_nonzero(y[t]) == 0
            continue
        ref, bound = REFS[_content_of(n)]
        err = (y[t].double() - ref[t]).abs().max().item()
        if err > bound:
            return f"row {t} adapter {n}: error {err:.3e} > bound {bound:.3e}"
    return None


def _check_stored(pool):
    """Every live adapter of the current snapshot holds exactly its content."""
    snap = pool.snapshot()
    for n, slot in snap.slot_of.items():
        c = CONTENTS[_content_of(n)]
        start, nnz = snap.extents[slot]
        assert int(snap.value_starts[slot]) == start and nnz == c["b"].nnz, n
        assert torch.equal(snap.masks[slot], c["b"].mask), n
        assert torch.equal(snap.values[start:start + nnz], c["b"].values), n
        assert torch.equal(snap.offsets[slot], c["b"].offsets), n
        assert L.spec.seed_from_op(int(snap.seeds[slot])) == c["seed"], n
        assert snap.dists[slot] == c["distribution"], n
        assert float(snap.scales[slot]) == float(torch.tensor(c["scale"]).float()), n


# ---- deterministic semantics ---------------------------------------------------------------------

def test_add_is_all_or_nothing():
    pool = L.AdapterPool(IN, OUT, RANK, capacity=1)
    _add(pool, "a0_0", 0)
    before = [t.clone() for t in pool.op_args()[:7]]
    snap0 = pool.snapshot()
    b = CONTENTS[1]["b"]
    inf_b = L.PackedB(b.mask, b.values.double() * 1e300, b.offsets, RANK)
    cases = [(dict(scale=1e39), ValueError, "scale must be finite"),
             (dict(scale=float("nan")), ValueError, "scale must be finite"),
             (dict(scale=1e-45), ValueError, "scale must be finite"),
             (dict(b=inf_b), ValueError, "not finite"),
             (dict(b=random_packed(OUT, RANK + 1)), ValueError, "rank 9"),
             (dict(b=random_packed(OUT + 1, RANK)), ValueError, "out_features"),
             (dict(seed=-1), ValueError, "seed"),
             (dict(distribution="normal"), ValueError, "distribution"),
             (dict(name=""), ValueError, "non-empty"),
             (dict(name="__base__"), ValueError, "__base__"),
             (dict(name="a0_0"), ValueError, "already in this pool")]
    for kw, exc, msg in cases:
        args = dict(name="n", b=b, seed=5, scale=1.0, distribution="rademacher") | kw
        with pytest.raises(exc, match=msg):
            pool.add(args["name"], args["b"], seed=args["seed"], scale=args["scale"],
                     distribution=args["distribution"])
        # no slot, buffer, counter or snapshot changed (the pool was full: no growth either)
        assert pool.snapshot() is snap0 and pool.capacity == 1 and pool.names == ["a0_0"]
        for t, t0 in zip(pool.op_args()[:7], before):
            assert torch.equal(t, t0)
    assert pool.free_slots() == set()


def test_plan_held_across_remove_compact_growth_and_reuse():
    pool = L.AdapterPool(IN, OUT, RANK, capacity=2)
    ids = [_add(pool, f"a{k}_0", k) for k in range(2)]
    assert isinstance(ids[0], SlotId) and ids == [0, 1]
    names = ["a0_0", "a1_0", None, "a1_0"]
    plan = pool.plan(names)
    x = X[:4]
    y0 = L.batched_sparse_delta(x, plan.ids, plan)
    assert _check_read(y0, names) is None
    pool.remove("a1_0")                           # retired: the plan still reads it
    assert 1 in pool._retired and pool.free_slots() == set()
    with pytest.raises(KeyError, match="a1_0"):
        pool.plan(["a1_0"])
    with pytest.raises(ValueError, match="not a live slot"):
        pool.plan([1])
    _add(pool, "a2_0", 2)                         # slot 1 is retired: a new slot (growth)
    assert pool.index("a2_0") == 2 and pool.capacity == 4
    pool.compact(2000)                            # new arena, published with a new snapshot
    for k in range(3, 8):                         # more growth and arena compaction
        _add(pool, f"a{k}_0", k)
    assert torch.equal(L.batched_sparse_delta(x, plan.ids, plan), y0)  # unchanged reads
    _check_stored(pool)
    # growth built a new masks table with the retired row cleared: slot 1 was reused there
    # (the held plan reads the old table), and the SlotId of the removed adapter is refused
    assert pool.snapshot().names[1] is not None
    with pytest.raises(ValueError, match="stale"):
        pool.plan([ids[1]])
    assert pool.plan([int(ids[1])]).ids.tolist() == [1]   # a plain int is a position
    del plan, y0
    # with no plan held, a removed slot is reclaimed at once and reads as an empty adapter
    victim = pool.snapshot().names[1]
    pool.remove(victim)
    assert 1 in pool.free_slots()
    raw = L.batched_sparse_delta(x, torch.tensor([1, 1, 0, 2], dtype=torch.int32), pool)
    assert _check_read(raw, [None, None, "a0_0", "a2_0"]) is None
    new = _add(pool, "a9_0", 9)
    assert new == 1 and new.generation == 3
    assert _check_read(L.batched_sparse_delta(x[:1], pool.ids([new]), pool), ["a9_0"]) is None


def test_remove_without_readers_reclaims_at_once_and_layer_plans():
    pool = L.AdapterPool(IN, OUT, RANK)
    for k in range(3):
        _add(pool, f"a{k}_0", k)
    lin = torch.nn.Linear(IN, OUT)
    torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
    layer = L.LoRIPoolLinear(lin, pool)
    layer.set_adapter_ids(["a2_0", "a0_0"])          # one per sequence: a plan kept
    x = X[:6].reshape(2, 3, IN)
    y = layer(x)
    pool.remove("a2_0")
    assert 2 in pool._retired                          # the layer's plan holds it
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    plan = pool.plan(["a0_0", None])
    yp = layer(x, plan=plan)
    assert _check_read(yp.reshape(6, OUT), ["a0_0"] * 3 + [None] * 3) is None
    layer.set_adapter_ids(plan)
    del plan
    assert pool.reclaim() == [2]
    pool.remove("a1_0")
    assert 1 in pool._retired            # the layer's plan was made while a1_0 was live
    layer.set_adapter_ids(["a0_0"] * 6)
    assert pool.reclaim() == [1] and pool.free_slots() == {1, 2, 3}
    layer.set_adapter_ids(torch.zeros(6, dtype=torch.int32))  # raw ids hold no snapshot
    pool.remove("a0_0")
    assert 0 not in pool._retired and pool.free_slots() == {0, 1, 2, 3}


# ---- the stress test -----------------------------------------------------------------------------

def _stress(seconds, iters, seed=0):
    pool = L.AdapterPool(IN, OUT, RANK, capacity=2, arena=0)
    for k in range(3):
        _add(pool, f"a{k}_init", k)
    lin = torch.nn.Linear(IN, OUT)
    torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
    layer = L.LoRIPoolLinear(lin, pool)
    stop = threading.Event()
    errors, counts = [], {"reads": 0, "writes": 0, "raw": 0}
    lock = threading.Lock()
    serial = iter(range(10**9))

    def reader(rid):
        rng = random.Random(seed * 100 + rid)
        try:
            while not stop.is_set():
                snap = pool.snapshot()
                live = list(snap.slot_of)
                names = [rng.choice(live) if live and rng.random() < 0.85 else None
                         for _ in range(rng.randint(1, X.shape[0]))]
                plan = snap.plan(names)
                x = X[:len(names)]
                if rid % 2:
                    y = L.batched_sparse_delta(x, plan.ids, plan)
                else:
                    y = layer(x, plan=plan)
                bad = _check_read(y, names)
                with lock:
                    counts["reads"] += 1
                    if bad:
                        errors.append(f"reader {rid}: {bad}")
        except Exception as e:  # noqa: BLE001 - every failure is reported
            errors.append(f"reader {rid}: {type(e).__name__}: {e}")

    def writer(wid):
        rng = random.Random(seed * 100 + 50 + wid)
        try:
            for i in range(iters):
                if stop.is_set():
                    break
                op = rng.random()
                live = pool.names
                if op < 0.5 or len(live) < 2:
                    k = rng.randrange(K)
                    _add(pool, f"a{k}_{wid}_{next(serial)}", k)
                elif op < 0.9:
                    try:
                        pool.remove(rng.choice(live))
                    except KeyError:  # the other writer removed it first
                        pass
                else:
                    pool.compact()
                with lock:
                    counts["writes"] += 1
                if i % 50 == 0:
                    _check_stored(pool)
        except Exception as e:  # noqa: BLE001
            errors.append(f"writer {wid}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=reader, args=(r,)) for r in range(3)]
    writers = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads + writers:
        t.start()
    deadline = time.monotonic() + seconds
    for t in writers:
        t.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    for t in threads + writers:
        t.join()
    _check_stored(pool)
    # no two live adapters share arena values; every live extent lies inside the arena
    snap = pool.snapshot()
    spans = sorted(snap.extents[s] for s in snap.slot_of.values())
    for (s0, n0), (s1, _) in zip(spans, spans[1:]):
        assert s0 + n0 <= s1
    assert all(s + n <= snap.values.numel() for s, n in spans)
    return errors, counts


def test_stress_readers_and_writers():
    """3 reader threads (op and layer) against 2 writer threads adding, removing, compacting
    and growing the pool: every read checked against the references of the adapters its plan
    named, the stored adapters checked every 50 writes and at the end."""
    errors, counts = _stress(seconds=40, iters=1500)
    assert not errors, errors[:5]
    assert counts["reads"] > 200 and counts["writes"] > 500, counts


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LORI_SLOW"), reason="long stress test: LORI_SLOW=1")
def test_stress_readers_and_writers_long():
    errors, counts = _stress(seconds=600, iters=30000, seed=1)
    assert not errors, errors[:5]

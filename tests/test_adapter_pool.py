"""AdapterPool (add, remove, lookup, compaction, bytes, validation of what is added) and
LoRIPoolLinear (adapter ids per token or per sequence, a multi-task training step) on the CPU.
The batched op itself, on every backend, is tests/test_op_batched.py."""
import pytest
import torch

import lori_kernels as L
from lori_kernels.testing import random_packed

from batched_cases import IN, OUT, RANK, make_pool


def _gen(seed):
    return torch.Generator().manual_seed(seed)


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


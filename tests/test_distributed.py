"""LoRI under torch.distributed on 2 gloo processes (127.0.0.1), compared to one process."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lori_kernels as L
from lori_kernels import distributed as D
from lori_kernels.workflow import lori_layers

import dist_cases

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(case, tmp_path, deadline_s: float = 80):
    ctx = mp.start_processes(dist_cases.run, args=(WORLD, _free_port(), str(tmp_path), case),
                             nprocs=WORLD, join=False, start_method="spawn")
    # Bounded: a hang (a rank left in a collective) fails the test instead of blocking CI.
    import time
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{case}: the ranks did not finish within {deadline_s:g} s (a hang)")
    return [torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ddp_through_both_phases_matches_one_process(tmp_path):
    res = spawn("ddp_phases", tmp_path)
    model = dist_cases.mlp()
    x, y = dist_cases.data()
    losses = []

    def train(steps):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))

    train(3)
    masks = L.calibrate_masks(model, 0.5, init="keep")
    train(3)
    ref = dist_cases.values(model)
    for r in res:
        assert r["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
        for n in ref:
            assert torch.equal(r["masks"][n], masks[n])
            torch.testing.assert_close(r["values"][n], ref[n], rtol=1e-5, atol=1e-6)
        assert r["a_identical"]
        assert r["stale_after_rebuild"][0] == "StaleDDPError"
        assert r["stale_plain"][0] == "StaleDDPError"
        assert "were replaced" in r["stale_plain"][1]
    # both ranks trained the same values (the rebuilt wrapper all-reduces the LoRI-S values)
    for n in ref:
        assert torch.equal(res[0]["values"][n], res[1]["values"][n])


def test_verify_raises_the_same_error_on_every_rank(tmp_path):
    res = spawn("verify_cases", tmp_path)
    for case, field in (("seed", "seed"), ("mask", "mask"), ("nnz", "nnz")):
        errs = [r[case] for r in res]
        assert errs[0] is not None and errs[0][0] == "VerifyError", (case, errs)
        assert errs[0] == errs[1], f"{case}: the ranks raised different errors"
        assert f"{field} is" in errs[0][1]
    assert res[0]["ok"] is None and res[1]["ok"] is None
    plain = dist_cases.mlp()
    seeds = {n: l.adapters["default"].seed for n, l in lori_layers(plain).items()}
    for r in res:
        assert r["wrapped_seeds"] == seeds
        assert r["inject_after_wrap"][0] == "StaleDDPError"
        assert "not registered" in r["inject_after_wrap"][1]
        for got, want in r["threshold"]:
            assert got == want


def test_inject_under_wrappers_gives_the_plain_seeds_and_files(tmp_path):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    wrapped = torch.compile(nn.DataParallel(
        nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))))
    L.inject(plain, ["0", "2"], rank=4, alpha=8.0, seed=7)
    L.inject(wrapped, ["0", "2"], rank=4, alpha=8.0, seed=7)
    names = list(lori_layers(wrapped))
    assert names == ["_orig_mod.module.0", "_orig_mod.module.2"]
    assert [D.canonical_name(wrapped, n) for n in names] == ["0", "2"]
    assert [l.adapters["default"].seed for l in lori_layers(wrapped).values()] == \
        [l.adapters["default"].seed for l in lori_layers(plain).values()]
    for l in lori_layers(wrapped).values():
        l.adapters["default"].values.data.normal_()
    L.save_adapter(wrapped, tmp_path / "a")
    fresh = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    L.load_adapter(fresh, tmp_path / "a")
    for (n, a), b in zip(lori_layers(fresh).items(), lori_layers(wrapped).values()):
        assert torch.equal(a.adapters["default"].values, b.adapters["default"].values)
    # and a plain model's file loads into a wrapped one
    again = torch.compile(nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)))
    L.load_adapter(again, tmp_path / "a")
    assert list(lori_layers(again)) == ["_orig_mod.0", "_orig_mod.2"]


@pytest.mark.slow  # ~70 s on 2 busy cores: two processes import transformers
def test_tensor_parallel_llama_matches_one_process(tmp_path):
    pytest.importorskip("transformers")
    res = spawn("tp_llama", tmp_path)
    model = dist_cases.llama_with_adapter()
    with torch.no_grad():
        logits = model(input_ids=dist_cases.llama_batch()).logits
    losses = dist_cases.llama_train(model, 2)
    for r in res:
        torch.testing.assert_close(r["logits"], logits, rtol=1e-4, atol=1e-5)
        assert r["losses"] == pytest.approx(losses, rel=1e-5)
    for n, layer in lori_layers(model).items():
        ref = layer.adapters["default"].dense_b()
        kinds = {r["shards"][n][0] for r in res}
        if kinds == {"colwise"}:
            got = torch.cat([r["shards"][n][1] for r in res])
        else:
            assert kinds == {"rowwise"}
            got = res[0]["shards"][n][1]
            assert torch.equal(got, res[1]["shards"][n][1])  # B replicated, same on each rank
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_a_column_windows_sum_to_the_full_delta():
    """What the row-parallel route rests on: A's column windows (full-width scale) are A's
    columns bit for bit, and their partial h add up to the delta sparse_delta computes."""
    torch.manual_seed(0)
    layer = L.LoRILinear.from_linear(nn.Linear(40, 24), rank=8, alpha=16.0, seed=9)
    ad = layer.adapters["default"]
    ad.values.data.normal_()
    x = torch.randn(5, 40)
    full = L.nn.linear.lori_delta(x, ad, ad, ad.scale)
    a = L.random_a(ad.seed, 8, 40)
    parts = [L.random_a(ad.seed, 8, 40, columns=(c, c + 20)) for c in (0, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), a, rtol=0, atol=0)
    h = sum(x[:, c:c + 20] @ p.T for c, p in zip((0, 20), parts))
    torch.testing.assert_close(h @ ad.dense_b().T * ad.scale, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out,rank", [(200, 8), (64, 33), (130, 4)])
def test_row_slice_matches_dense_rows(out, rank):
    g = torch.Generator().manual_seed(out + rank)
    b = torch.randn(out, rank, generator=g)
    p = L.pack_bitmask(b, torch.rand(out, rank, generator=g) < 0.3)
    for o0, o1 in [(0, out), (0, 64), (64, out), (3, out), (5, 70), (64, 100), (out - 1, out),
                   (0, 1), (128, out)]:
        if o1 > out or o0 >= o1:
            continue
        s = p.row_slice(o0, o1).validate()
        assert torch.equal(s.to_dense(), p.to_dense()[o0:o1]), (o0, o1)
    with pytest.raises(ValueError, match="o0"):
        p.row_slice(5, 3)

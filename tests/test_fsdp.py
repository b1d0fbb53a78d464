"""The LoRI workflow under FSDP2 (fully_shard, values and base weights sharded as DTensors) on
2 gloo processes (127.0.0.1), compared to one process on the same weights: calibrate_masks,
training after the switch, save_adapter / save_pretrained, merge, the refused in-place switch,
and torch.distributed.checkpoint in both phases."""
import os

import pytest
import torch
import torch.distributed as dist

import lori_kernels as L
from lori_kernels.workflow import lori_layers, merge, unmerge

import dist_cases
from test_distributed import spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _contents(path):
    """A safetensors file's metadata and tensors. Not its bytes: safetensors writes the
    metadata's keys in a per-process random order (a hash map), so two processes saving the
    same adapter give the same contents in different bytes."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _same_file(a, b):
    (ma, ta), (mb, tb) = _contents(a), _contents(b)
    assert ma == mb, (a, b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def _ok(res, *keys):
    for r, out in enumerate(res):
        for k in keys:
            assert out[k] is None, f"rank {r}: {k} raised {out[k]}"


def test_fsdp_workflow_matches_one_process(tmp_path):
    res = spawn("fsdp_workflow", tmp_path)
    assert all(r["sharded"] for r in res)
    # one process, same weights and whole batch
    model = dist_cases.fsdp_mlp()
    losses_d = dist_cases.fsdp_train(model, 3)
    values_d = dist_cases.full_values(model)
    masks = L.calibrate_masks(model, 0.6, apply=False)
    masks_layer = L.calibrate_masks(model, 0.6, scope="matrix", apply=False)
    _ok(res, "calibrate", "calibrate_layer", "after_switch", "save", "save_pretrained",
        "merge", "unmerge")
    for r in res:
        assert r["losses_d"] == pytest.approx(losses_d, rel=1e-5, abs=1e-7)
        for n in values_d:
            torch.testing.assert_close(r["values_d"][n], values_d[n], rtol=1e-5, atol=1e-6)
        # the masks are exact: the same threshold as one process on the gathered values
        for n in masks:
            assert torch.equal(r["masks"][n], masks[n]), n
            assert torch.equal(r["masks_layer"][n], masks_layer[n]), n
    # the in-place switch on a sharded model is refused on every rank, naming the order
    for key in ("calibrate_apply", "to_sparse"):
        errs = [r[key] for r in res]
        assert errs[0] is not None and errs[0] == errs[1], (key, errs)
        assert "fully_shard" in errs[0][1] and "apply=False" in errs[0][1], errs[0]
    for r in res:  # ... and changed nothing
        for n in values_d:
            assert torch.equal(r["values_after_switch"][n], r["values_d"][n])
        with torch.no_grad():
            want = model(dist_cases.data()[0][:, :16])
        torch.testing.assert_close(r["y_after_switch"], want, rtol=1e-5, atol=1e-6)

    # save: the contents (and size) of a one-process save of the same values
    for l, v in zip(lori_layers(model).values(), res[0]["values_d"].values()):
        l.adapters["default"].values.data.copy_(v)
    n = L.save_adapter(model, tmp_path / "one.safetensors")
    assert res[0]["save_bytes"] == res[1]["save_bytes"] == n
    _same_file(tmp_path / "d.safetensors", tmp_path / "one.safetensors")
    # rank 0 failing raises on every rank
    errs = [r["save_fail"] for r in res]
    assert errs[0] is not None and errs[1] is not None, errs
    assert "rank 0" in errs[1][1] and errs[0][0] in errs[1][1], errs
    # save_pretrained: the same directory as one process
    one = dist_cases.lori_mlp()
    one.save_pretrained(tmp_path / "pretrained_one")
    got = sorted(os.listdir(tmp_path / "pretrained"))
    assert got == sorted(os.listdir(tmp_path / "pretrained_one"))
    assert (tmp_path / "pretrained" / "adapter_config.json").read_bytes() == \
        (tmp_path / "pretrained_one" / "adapter_config.json").read_bytes()
    _same_file(tmp_path / "pretrained" / "adapter_model.safetensors",
               tmp_path / "pretrained_one" / "adapter_model.safetensors")

    # merge: local on W's row shards, equal to one process
    w0 = dist_cases.full_weights(model)
    merge(model)
    merged = dist_cases.full_weights(model)
    unmerge(model)
    for r in res:
        for n in merged:
            torch.testing.assert_close(r["merged_w"][n], merged[n], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(r["unmerged_w"][n], w0[n], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(*r["y_merged"], rtol=1e-5, atol=1e-5)

    # LoRI-S under FSDP2 after the switch before fully_shard
    s_model = dist_cases.fsdp_mlp()
    L.to_sparse(s_model, masks, init="zero")
    losses_s = dist_cases.fsdp_train(s_model, 3)
    values_s = dist_cases.full_values(s_model)
    for r in res:
        assert r["losses_s"] == pytest.approx(losses_s, rel=1e-5, abs=1e-7)
        for n in values_s:
            torch.testing.assert_close(r["values_s"][n], values_s[n], rtol=1e-5, atol=1e-6)


def test_fsdp_dcp_both_phases(tmp_path):
    res = spawn("fsdp_dcp", tmp_path)
    _ok(res, "load_d", "load_s")
    for r in res:
        got_d, want_d = r["values_d"]
        for n in want_d:
            torch.testing.assert_close(got_d[n], want_d[n], rtol=0, atol=0)
        torch.testing.assert_close(*r["y_d"], rtol=1e-6, atol=1e-6)
        got_s, want_s = r["values_s"]
        for n in want_s:
            torch.testing.assert_close(got_s[n], want_s[n], rtol=0, atol=0)
        torch.testing.assert_close(*r["y_s"], rtol=1e-6, atol=1e-6)
        for n, (got, want) in r["masks_s"].items():
            assert torch.equal(got, want), n
        # a LoRI-S checkpoint into a sharded LoRI-D model: refused, naming what to do
        assert r["load_s_into_d_plain"] is not None  # DCP itself refuses the sizes
        err = r["match_sharded"]
        assert err is not None and err[0] == "ValueError", err
        assert "before fully_shard" in err[1] and "match_checkpoint" in err[1], err
    assert res[0]["match_sharded"] == res[1]["match_sharded"]

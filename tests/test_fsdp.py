"""The LoRI workflow under FSDP2 (fully_shard, values and base weights sharded as DTensors) on
2 gloo processes (127.0.0.1), compared to one process on the same weights: calibrate_masks,
training after the switch, save_adapter / save_pretrained, merge, the refused in-place switch,
and torch.distributed.checkpoint in both phases."""
import os

import pytest
import torch
import torch.distributed as dist

import lori_kernels as L
from lori_kernels import distributed as D
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


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One spawn of 2 gloo ranks running every FSDP2 case (tests/dist_cases.py fsdp_all);
    bounded: a hang fails within the deadline."""
    out = tmp_path_factory.mktemp("fsdp")
    res = spawn("fsdp_all", out, deadline_s=150)
    return out, [r["workflow"] for r in res], [r["dcp"] for r in res]


@pytest.fixture(scope="module")
def one():
    """One process on the same weights and the whole batch: LoRI-D training and the masks."""
    model = dist_cases.fsdp_mlp()
    losses = dist_cases.fsdp_train(model, 3)
    return {"model": model, "losses_d": losses, "values_d": dist_cases.full_values(model),
            "masks": L.calibrate_masks(model, 0.6, apply=False),
            "masks_layer": L.calibrate_masks(model, 0.6, scope="matrix", apply=False)}


def test_calibrate_under_fsdp_gives_the_one_process_masks(ranks, one):
    _, res, _ = ranks
    assert all(r["sharded"] for r in res)
    _ok(res, "calibrate", "calibrate_layer")
    for r in res:
        assert r["losses_d"] == pytest.approx(one["losses_d"], rel=1e-5, abs=1e-7)
        for n in one["values_d"]:
            torch.testing.assert_close(r["values_d"][n], one["values_d"][n], rtol=1e-5,
                                       atol=1e-6)
        # exact: the same threshold as one process on the gathered values
        for n in one["masks"]:
            assert torch.equal(r["masks"][n], one["masks"][n]), n
            assert torch.equal(r["masks_layer"][n], one["masks_layer"][n]), n
    assert 0 < sum(int(m.sum()) for m in one["masks"].values()) < 0.5 * (90 + 21)


def test_switch_on_a_sharded_model_is_refused_and_changes_nothing(ranks, one):
    _, res, _ = ranks
    _ok(res, "after_switch")
    for key in ("calibrate_apply", "to_sparse"):
        errs = [r[key] for r in res]
        assert errs[0] is not None and errs[0] == errs[1], (key, errs)
        assert errs[0][0] == "ShardedSwitchError", errs[0]
        assert "fully_shard" in errs[0][1] and "apply=False" in errs[0][1], errs[0]
    assert issubclass(D.ShardedSwitchError, RuntimeError)
    with torch.no_grad():
        want = one["model"](dist_cases.data()[0][:, :16])
    for r in res:
        for n in one["values_d"]:
            assert torch.equal(r["values_after_switch"][n], r["values_d"][n])
        torch.testing.assert_close(r["y_after_switch"], want, rtol=1e-5, atol=1e-6)


def test_save_under_fsdp_is_the_one_process_file(ranks, one, tmp_path):
    out, res, _ = ranks
    _ok(res, "save", "save_pretrained")
    model = dist_cases.fsdp_mlp()
    for l, v in zip(lori_layers(model).values(), res[0]["values_d"].values()):
        l.adapters["default"].values.data.copy_(v)
    n = L.save_adapter(model, tmp_path / "one.safetensors")
    assert res[0]["save_bytes"] == res[1]["save_bytes"] == n
    _same_file(out / "d.safetensors", tmp_path / "one.safetensors")
    # rank 0 failing raises on every rank (the other one does not wait forever)
    errs = [r["save_fail"] for r in res]
    assert errs[0] is not None and errs[0][0] == "FileExistsError", errs
    assert errs[1][0] == "RuntimeError" and "rank 0" in errs[1][1] and \
        "FileExistsError" in errs[1][1], errs
    # save_pretrained: the one-process directory
    dist_cases.lori_mlp().save_pretrained(tmp_path / "pretrained_one")
    assert sorted(os.listdir(out / "pretrained")) == \
        sorted(os.listdir(tmp_path / "pretrained_one"))
    assert (out / "pretrained" / "adapter_config.json").read_bytes() == \
        (tmp_path / "pretrained_one" / "adapter_config.json").read_bytes()
    _same_file(out / "pretrained" / "adapter_model.safetensors",
               tmp_path / "pretrained_one" / "adapter_model.safetensors")


def test_merge_on_row_shards_is_the_one_process_merge(ranks):
    _, res, _ = ranks
    _ok(res, "merge", "unmerge")
    model = dist_cases.fsdp_mlp()
    for l, v in zip(lori_layers(model).values(), res[0]["values_d"].values()):
        l.adapters["default"].values.data.copy_(v)
    w0 = dist_cases.full_weights(model)
    merge(model)
    merged = dist_cases.full_weights(model)
    unmerge(model)
    for r in res:
        for n in merged:
            assert not torch.equal(merged[n], w0[n])
            torch.testing.assert_close(r["merged_w"][n], merged[n], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(r["unmerged_w"][n], w0[n], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(*r["y_merged"], rtol=1e-5, atol=1e-5)


def test_lori_s_training_under_fsdp_matches_one_process(ranks, one):
    _, res, _ = ranks
    s_model = dist_cases.fsdp_mlp()
    L.to_sparse(s_model, one["masks"], init="zero")
    losses = dist_cases.fsdp_train(s_model, 3)
    values = dist_cases.full_values(s_model)
    for r in res:
        assert r["losses_s"] == pytest.approx(losses, rel=1e-5, abs=1e-7)
        for n in values:
            assert r["values_s"][n].numel() == int(one["masks"][n].sum())
            torch.testing.assert_close(r["values_s"][n], values[n], rtol=1e-5, atol=1e-6)


def test_dcp_save_and_load_in_both_phases(ranks):
    _, _, res = ranks
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
        # a LoRI-S checkpoint into a sharded LoRI-D model: DCP refuses the sizes, and
        # match_checkpoint says what to do instead
        assert r["load_s_into_d_plain"] is not None
        err = r["match_sharded"]
        assert err is not None and err[0] == "ValueError", err
        assert "before fully_shard" in err[1] and "match_checkpoint" in err[1], err
    assert res[0]["match_sharded"] == res[1]["match_sharded"]

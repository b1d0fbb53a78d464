"""LoRILinear: forward vs the reference, phases, gradients, state dict, merge, compile."""
import pytest
import torch
from torch import nn

from lori_kernels import reference
from lori_kernels.nn import LoRILinear, lori_delta

DIST = ("rademacher", "uniform")


def _layer(in_f=37, out_f=70, rank=8, alpha=16.0, seed=5, dist="rademacher", bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias)
    layer = LoRILinear.from_linear(lin, rank=rank, alpha=alpha, seed=seed, distribution=dist)
    with torch.no_grad():
        layer.adapters["default"].values.normal_()
    return lin, layer


def _ref(lin, layer, x, name="default"):
    ad = layer.adapters[name]
    return lin(x).double() + reference.sparse_delta(x, ad.dense_b(), ad.seed, ad.distribution,
                                                    ad.scale)


def _merge_available():
    return hasattr(torch.ops.lori, "merge_delta_")


@pytest.mark.parametrize("dist", DIST)
@pytest.mark.parametrize("rank", [1, 8, 33])
def test_forward_matches_reference(dist, rank):
    lin, layer = _layer(rank=rank, dist=dist)
    x = torch.randn(2, 5, 37)
    torch.testing.assert_close(layer(x).double(), _ref(lin, layer, x), atol=1e-5, rtol=1e-5)


def test_starts_as_base_and_a_not_a_parameter():
    lin = nn.Linear(16, 24)
    layer = LoRILinear.from_linear(lin, rank=4, alpha=8, seed=1)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), lin(x))  # B = 0 at start (LoRI-D)
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["adapters.default.values"]
    assert layer.adapters["default"].values.numel() == 24 * 4  # dense B in LoRI-D
    keys = set(layer.state_dict())
    assert keys == {"base.weight", "base.bias", "adapters.default.values",
                    "adapters.default.mask", "adapters.default.offsets",
                    "adapters.default._extra_state"}  # the recipe (seed, rank, alpha, phase)
    assert layer.weight is lin.weight and layer.in_features == 16


def test_sparse_phase_trains_only_mask_values():
    lin, layer = _layer()
    ad = layer.adapters["default"]
    mask = torch.rand(70, 8) < 0.1
    ad.set_pattern(mask, None)
    assert ad.phase == "sparse" and ad.nnz == int(mask.sum())
    opt = torch.optim.AdamW([ad.values], lr=1e-2, weight_decay=0.0)
    x = torch.randn(6, 37)
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()
    dense = ad.dense_b()
    assert (dense[~mask] == 0).all() and (dense[mask] != 0).any()
    state_numel = sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim())
    assert state_numel == 2 * int(mask.sum())  # AdamW state: ~10% of dense B's
    torch.testing.assert_close(layer(x).double(), _ref(lin, layer, x), atol=1e-5, rtol=1e-5)


def test_gradients_match_dense_autograd():
    lin, layer = _layer(rank=6)
    ad = layer.adapters["default"]
    x = torch.randn(4, 37, dtype=torch.float32, requires_grad=True)
    layer(x).sum().backward()
    a = ad.materialize_a()
    b = ad.dense_b().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    (lin(x2) + ad.scale * (x2 @ a.T) @ b.T).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ad.values.grad, b.grad.flatten(), atol=1e-5, rtol=1e-5)
    assert lin.weight.grad is None


def test_explicit_a_fallback_matches_seeded_path():
    lin, layer = _layer(rank=5)
    ad = layer.adapters["default"]
    ad.set_pattern(torch.rand(70, 5) < 0.3, ad.dense_b(), phase="sparse")
    layer.add_adapter("explicit", rank=5, alpha=ad.alpha, seed=None, a=ad.materialize_a(),
                      activate=False)
    layer.adapters["explicit"].set_pattern(ad.bool_mask(), ad.dense_b(), phase="sparse")
    x = torch.randn(3, 37, requires_grad=True)
    y_seed = layer(x)
    layer.set_active("explicit")
    y_expl = layer(x)
    torch.testing.assert_close(y_seed, y_expl, atol=1e-5, rtol=1e-5)
    y_expl.sum().backward()
    assert layer.adapters["explicit"].values.grad.shape == (ad.nnz,)


def test_multi_adapter_terms_and_cross_term():
    lin, layer = _layer(rank=4)
    layer.add_adapter("t2", rank=4, alpha=4.0, seed=99)
    with torch.no_grad():
        layer.adapters["t2"].values.normal_()
    x = torch.randn(3, 37)
    d1 = lori_delta(x, layer.adapters["default"], layer.adapters["default"], 1.0)
    d2 = lori_delta(x, layer.adapters["t2"], layer.adapters["t2"], 1.0)
    layer.set_active(["default", "t2"], [0.5, 2.0])
    expect = lin(x) + 0.5 * layer.adapters["default"].scale * d1 + 2.0 * 1.0 * d2
    torch.testing.assert_close(layer(x), expect, atol=1e-5, rtol=1e-5)
    # B of one adapter with A (seed) of the other
    cross = lori_delta(x, layer.adapters["default"], layer.adapters["t2"], 1.0)
    a2 = layer.adapters["t2"].materialize_a()
    torch.testing.assert_close(cross, x @ a2.T @ layer.adapters["default"].dense_b().T,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not _merge_available(), reason="lori::merge_delta_ not registered yet")
@pytest.mark.parametrize("dist", DIST)
def test_merge_unmerge(dist):
    lin, layer = _layer(dist=dist)
    w0 = lin.weight.detach().clone()
    x = torch.randn(4, 37)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lin(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(lin.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)


def test_bf16_input():
    lin, layer = _layer()
    layer = layer.to(torch.bfloat16)
    x = torch.randn(3, 37, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = _ref(lin.float(), layer.float(), x.float())
    torch.testing.assert_close(y.double(), ref, atol=0.1, rtol=0.05)


def test_compile_fullgraph():
    torch._dynamo.reset()
    lin, layer = _layer(rank=4)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(70, 3))
    x = torch.randn(5, 37)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-5)
    compiled(x).sum().backward()
    assert layer.adapters["default"].values.grad is not None


def test_rejects_bad_inputs():
    with pytest.raises(TypeError):
        LoRILinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError):
        LoRILinear.from_linear(nn.Linear(4, 4), rank=0, alpha=1, seed=1)
    _, layer = _layer()
    with pytest.raises(ValueError):
        layer.add_adapter("default", rank=2, alpha=1, seed=2)
    with pytest.raises(ValueError):
        layer.adapters["default"].set_pattern(torch.ones(3, 3, dtype=torch.bool))

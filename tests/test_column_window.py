"""The column window of the ops that read A (sparse_delta, sparse_delta_fwd,
sparse_delta_backward, merge_delta_ and their triton_* twins): x holds A's columns
[col_start, col_start + width) of an A in_features wide, scaled and indexed as the whole A.

Checked on every backend (tests/window_cases.py) and every C++ CPU ISA path: each shard
against the float64 reference within the tolerance rule, the sum over shards against the
unsharded reference, A's window bit-identical to random_a's columns (read back through the
kernels with identity x and B), float64 gradcheck, opcheck, bad windows raising errors that
name the argument, and h reaching saved_tensors_hooks under LoRILinear."""
import pytest
import torch

import lori_kernels as L
from lori_kernels import ops, reference
from lori_kernels._library import ops as lori
from lori_kernels.testing import assert_within_rule, random_packed, tolerance_bound
from window_cases import BACKENDS, IN_FEATURES, ISAS, cpu_isa, shards

SEED = 0x1234_5678_9ABC_DEF0  # both key words nonzero; < 2^63, so the ops take it as is
DISTS = ["rademacher", "uniform"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _b(out, rank, dtype=torch.float32, device="cpu", seed=3, mask="random", density=0.3):
    b = random_packed(out, rank, density=density, dtype=dtype, generator=_gen(seed), mask=mask)
    return b.to(device) if device != "cpu" else b


def _dense(b):
    return b.to_dense().double().cpu()


def _a_window(rank, dist, c0, c1, dtype=torch.float32):
    return reference.random_a(spec_seed(), rank, IN_FEATURES, dist, dtype=dtype, col_start=c0,
                              col_end=c1)


def spec_seed():
    return SEED % (1 << 64)  # the unsigned seed the reference takes


def _identity_b(rank, dtype, device):
    """B = I (rank x rank): y = h exactly."""
    b = L.pack_bitmask(torch.eye(rank, dtype=dtype), mask=torch.eye(rank, dtype=torch.bool))
    return b if device == "cpu" else b.to(device)


# ---- each shard and the shard sum against the reference ------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("T", [1, 3, 9, 40])
def test_shards_match_reference_and_sum_to_unsharded(backend, device, dist, T):
    rank, out = 12, 70
    b = _b(out, rank, device=device)
    x = torch.randn(T, IN_FEATURES, generator=_gen(T)).to(device)
    scale = 0.75
    ref_full = reference.sparse_delta(x.cpu(), _dense(b), spec_seed(), dist, scale)
    total = torch.zeros(T, out, dtype=torch.float64)
    base_total = torch.zeros(T, out, dtype=torch.float32)
    for c0, c1 in shards():
        xs = x[:, c0:c1]
        y = ops.sparse_delta(xs, b, seed=SEED, distribution=dist, scale=scale, col_start=c0,
                             in_features=IN_FEATURES, backend=backend)
        ref = reference.sparse_delta(xs.cpu(), _dense(b), spec_seed(), dist, scale,
                                     col_start=c0, in_features=IN_FEATURES)
        a = _a_window(rank, dist, c0, c1)
        base = reference.dense_lora(xs.cpu(), a, b.to_dense().cpu(), scale)
        assert_within_rule(y.cpu(), ref, base, f"shard [{c0}, {c1})")
        total += y.double().cpu()
        base_total += base
    # The reference's shards add up to the unsharded reference, and the kernels' sum is
    # within the rule of what plain torch gets doing the same sharded sum in fp32.
    torch.testing.assert_close(sum(reference.sparse_delta(
        x[:, c0:c1].cpu(), _dense(b), spec_seed(), dist, scale, col_start=c0,
        in_features=IN_FEATURES) for c0, c1 in shards()), ref_full, rtol=1e-12, atol=1e-12)
    err = (total - ref_full).abs().max().item()
    assert err <= len(shards()) * tolerance_bound(ref_full, base_total), err


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("T", [1, 4, 12, 33])
def test_cpu_isa_paths_window(isa, dist, dtype, T):
    """Every vector path of the C++ CPU kernels (direct dots, GEMM tiles, decode/prefill B
    stages, the AVX-512 sign paths) with windows that start off Philox block edges."""
    rank, out = 20, 65
    b = _b(out, rank, dtype=dtype, seed=5)
    x = torch.randn(T, IN_FEATURES, generator=_gen(7)).to(dtype)
    gy = torch.randn(T, out, generator=_gen(8)).to(dtype)
    with cpu_isa(isa):
        for c0, c1 in shards():
            xs = x[:, c0:c1].contiguous()
            y, h = lori.sparse_delta_fwd(xs, b.mask, b.values, b.offsets, rank, SEED, dist, 1.5,
                                         c0, IN_FEATURES)
            ref = reference.sparse_delta(xs, _dense(b), spec_seed(), dist, 1.5, col_start=c0,
                                         in_features=IN_FEATURES)
            a = _a_window(rank, dist, c0, c1, dtype)
            base = reference.dense_lora(xs, a, b.to_dense(), 1.5)
            assert_within_rule(y, ref, base, f"y [{c0}, {c1})")
            href = reference.shrink(xs, rank, spec_seed(), dist, c0, IN_FEATURES)
            assert_within_rule(h, href, torch.nn.functional.linear(xs, a),
                               f"h [{c0}, {c1})")
            for saved in (None, h):
                gx, gv = lori.sparse_delta_backward(gy, xs, b.mask, b.values, b.offsets, rank,
                                                    SEED, dist, 1.5, True, True, saved, c0,
                                                    IN_FEATURES)
                x64 = xs.detach().double().clone().requires_grad_()
                v64 = b.values.detach().double().clone().requires_grad_()
                dense = torch.zeros(out, rank, dtype=torch.float64).masked_scatter(
                    b.bool_mask(), v64)
                reference.sparse_delta(x64, dense, spec_seed(), dist, 1.5, col_start=c0,
                                       in_features=IN_FEATURES).backward(gy.double())
                xd = xs.detach().clone().requires_grad_()
                vd = b.values.detach().clone().requires_grad_()
                dd = torch.zeros(out, rank, dtype=dtype).masked_scatter(b.bool_mask(), vd)
                reference.dense_lora(xd, a, dd, 1.5).backward(gy)
                assert_within_rule(gx, x64.grad, xd.grad, f"grad_x [{c0}, {c1})")
                assert_within_rule(gv, v64.grad, vd.grad, f"grad_values [{c0}, {c1})")


# ---- A's window is bit-identical to random_a's columns -------------------------------------

def _windows():
    # (c0, width): width 1, starts off every power-of-two edge, a block-straddling window.
    return [(37, 1), (1, 3), (5, 10), (129, 64), (61, 200), (0, IN_FEATURES)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("c0,width", _windows())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_window_of_a_is_bit_identical(backend, device, dist, c0, width, dtype):
    """x = rows of I and B = I read A's window back exactly (every product has one nonzero
    term): forward (y = A^T rows), backward (grad_x = rows of A with grad_y = I), merge (a zero
    weight shard becomes A's window)."""
    if backend == "triton" and dtype == torch.float32:
        pytest.skip("Triton fp32 dots may use other association; exactness is fp64's")
    rank = 16
    want = L.random_a(SEED, rank, IN_FEATURES, distribution=dist, dtype=torch.float64,
                      columns=(c0, c0 + width))
    torch.testing.assert_close(want, L.random_a(SEED, rank, IN_FEATURES, distribution=dist,
                                                dtype=torch.float64)[:, c0:c0 + width],
                               rtol=0, atol=0)
    eye_b = _identity_b(rank, dtype, device)
    for sel in (torch.arange(width), torch.arange(width)[: min(width, 3)]):
        x = torch.eye(width, dtype=dtype)[sel].to(device)
        y = ops.sparse_delta(x, eye_b, seed=SEED, distribution=dist, col_start=c0,
                             in_features=IN_FEATURES, backend=backend)
        assert torch.equal(y.double().cpu(), want[:, sel].T), "forward"
    gy = torch.eye(rank, dtype=dtype).to(device)
    xz = torch.zeros(rank, width, dtype=dtype, device=device)
    gx, _ = ops.sparse_delta_backward(gy, xz, eye_b.mask, eye_b.values, eye_b.offsets, rank,
                                      SEED, dist, 1.0, True, False, backend=backend,
                                      col_start=c0, in_features=IN_FEATURES)
    assert torch.equal(gx.double().cpu(), want), "grad_x"
    w = torch.zeros(rank, width, dtype=dtype, device=device)
    ops.merge_delta_(w, eye_b, seed=SEED, distribution=dist, col_start=c0,
                     in_features=IN_FEATURES, backend=backend)
    assert torch.equal(w.double().cpu(), want), "merge"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("c0,width", _windows())
def test_window_of_a_is_bit_identical_on_every_isa(isa, dist, c0, width):
    rank = 16
    want = L.random_a(SEED, rank, IN_FEATURES, distribution=dist, columns=(c0, c0 + width))
    eye_b = _identity_b(rank, torch.float32, "cpu")
    with cpu_isa(isa):
        for n in sorted({width, min(width, 1), min(width, 3), min(width, 12)}):
            x = torch.eye(width)[:n]
            y = ops.sparse_delta(x, eye_b, seed=SEED, distribution=dist, col_start=c0,
                                 in_features=IN_FEATURES)
            assert torch.equal(y, want[:, :n].T), f"forward, {n} tokens"
        for n in (1, 3, rank):
            gy = torch.eye(rank)[:n]
            gx, _ = ops.sparse_delta_backward(gy, torch.zeros(n, width), eye_b.mask,
                                              eye_b.values, eye_b.offsets, rank, SEED, dist,
                                              1.0, True, False, col_start=c0,
                                              in_features=IN_FEATURES)
            assert torch.equal(gx, want[:n]), f"grad_x, {n} tokens"


# ---- merge_delta_ on a column shard ---------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_on_column_shards_equals_the_merged_weight(backend, device, dist, dtype):
    out, rank = 70, 12
    b = _b(out, rank, dtype=dtype, device=device)
    w = torch.randn(out, IN_FEATURES, generator=_gen(11)).to(dtype)
    full = reference.merge_delta(w, _dense(b).to(dtype), spec_seed(), dist, 0.5)
    for c0, c1 in shards():
        shard = w[:, c0:c1].clone().to(device)
        ops.merge_delta_(shard, b, seed=SEED, distribution=dist, scale=0.5, col_start=c0,
                         in_features=IN_FEATURES, backend=backend)
        ref = reference.merge_delta(w[:, c0:c1], _dense(b).to(dtype), spec_seed(), dist, 0.5,
                                    col_start=c0, in_features=IN_FEATURES)
        a = _a_window(rank, dist, c0, c1, torch.float64)
        ref64 = w[:, c0:c1].double() + 0.5 * _dense(b).to(dtype).double() @ a
        base = w[:, c0:c1] + 0.5 * (b.to_dense().cpu().to(dtype) @ a.to(dtype))
        assert_within_rule(shard.cpu(), ref64, base, f"merged shard [{c0}, {c1})")
        torch.testing.assert_close(ref, full[:, c0:c1], rtol=0, atol=0)


# ---- gradients, opcheck ---------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dist", DISTS)
def test_gradcheck_windowed_sparse_delta(backend, device, dist):
    rank, out, n = 5, 9, 40
    b = _b(out, rank, dtype=torch.float64, device=device, density=0.5)
    x = torch.randn(3, 7, dtype=torch.float64, generator=_gen(1)).to(device).requires_grad_()
    v = b.values.clone().requires_grad_()

    def f(x, v):
        return ops._sparse_delta(x, b.mask, v, b.offsets, rank, SEED, dist, 0.7, backend,
                                 13, n)

    assert torch.autograd.gradcheck(f, (x, v))


def _window_args(dtype=torch.float64, T=3, width=11, c0=21, n=50, rank=6, out=10):
    b = _b(out, rank, dtype=dtype, density=0.4)
    x = torch.randn(T, width, dtype=dtype, generator=_gen(2))
    return x, b, c0, n


@pytest.mark.parametrize("prefix", ["", "triton_"])
def test_opcheck_windowed_ops(prefix):
    if prefix and BACKENDS[1].marks:
        pytest.skip(BACKENDS[1].marks[0].kwargs["reason"])
    x, b, c0, n = _window_args(torch.float32)
    rank, out = b.rank, b.out_features
    gy = torch.randn(x.shape[0], out)
    sd = getattr(lori, f"{prefix}sparse_delta")
    torch.library.opcheck(sd, (x, b.mask, b.values.clone().requires_grad_(), b.offsets, rank,
                               SEED, "uniform", 0.5, c0, n))
    torch.library.opcheck(getattr(lori, f"{prefix}sparse_delta_backward"),
                          (gy, x, b.mask, b.values, b.offsets, rank, SEED, "rademacher", 0.5,
                           True, True, c0, n) if prefix else
                          (gy, x, b.mask, b.values, b.offsets, rank, SEED, "rademacher", 0.5,
                           True, True, None, c0, n))
    torch.library.opcheck(getattr(lori, f"{prefix}merge_delta_"),
                          (torch.randn(out, x.shape[1]), b.mask, b.values, b.offsets, rank, SEED,
                           "uniform", 0.5, c0, n))
    if not prefix:
        torch.library.opcheck(lori.sparse_delta_fwd, (x, b.mask, b.values, b.offsets, rank,
                                                      SEED, "rademacher", 0.5, c0, n))


# ---- bad windows ----------------------------------------------------------------------------

BAD_WINDOWS = [
    (-1, 50, "col_start must be >= 0"),
    (40, 50, "exceeds in_features"),        # 40 + 11 > 50
    (1, -1, "exceeds in_features"),         # -1: x's width, so only col_start 0 fits
    (0, 0, "in_features must be >= 1"),
    (0, -2, "in_features must be >= 1"),
    (0, 1 << 31, "in_features must be in"),
]


@pytest.mark.parametrize("c0,n,msg", BAD_WINDOWS)
@pytest.mark.parametrize("where", ["cpp", "triton", "meta", "reference"])
def test_bad_window_is_an_error_naming_the_argument(c0, n, msg, where):
    x, b, _, _ = _window_args(torch.float32)
    if where == "reference":
        if "in_features must" in msg:
            pytest.skip("the reference checks the window only (its input is trusted)")
        with pytest.raises(ValueError, match="exceeds in_features"):
            reference.sparse_delta(x, _dense(b), spec_seed(), "rademacher", 1.0, col_start=c0,
                                   in_features=n)
        return
    if where == "triton" and BACKENDS[1].marks:
        pytest.skip(BACKENDS[1].marks[0].kwargs["reason"])
    prefix = "triton_" if where == "triton" else ""
    dev = "meta" if where == "meta" else "cpu"
    args = [t.to(dev) for t in (x, b.mask, b.values, b.offsets)]
    with pytest.raises(ValueError, match=msg):
        getattr(lori, f"{prefix}sparse_delta")(*args, b.rank, SEED, "rademacher", 1.0, c0, n)
    w = torch.zeros(b.out_features, x.shape[1], device=dev)
    with pytest.raises(ValueError, match=msg):
        getattr(lori, f"{prefix}merge_delta_")(w, *args[1:], b.rank, SEED, "rademacher", 1.0, c0,
                                               n)
    gy = torch.zeros(x.shape[0], b.out_features, device=dev)
    bwd = getattr(lori, f"{prefix}sparse_delta_backward")
    extra = () if prefix else (None,)
    with pytest.raises(ValueError, match=msg):
        bwd(gy, *args, b.rank, SEED, "rademacher", 1.0, True, True, *extra, c0, n)
    if not prefix:
        with pytest.raises(ValueError, match=msg):
            lori.sparse_delta_fwd(*args, b.rank, SEED, "rademacher", 1.0, c0, n)


def test_public_wrappers_reject_non_int_windows():
    x, b, _, _ = _window_args(torch.float32)
    with pytest.raises(TypeError, match="col_start must be an int"):
        ops.sparse_delta(x, b, seed=1, col_start=1.5, in_features=50)
    with pytest.raises(TypeError, match="in_features must be an int"):
        ops.sparse_delta(x, b, seed=1, col_start=1, in_features="50")


def test_default_window_is_the_unsharded_call():
    x, b, _, _ = _window_args(torch.float32)
    y0 = ops.sparse_delta(x, b, seed=SEED)
    y1 = ops.sparse_delta(x, b, seed=SEED, col_start=0, in_features=x.shape[-1])
    assert torch.equal(y0, y1)


def test_empty_tokens_with_a_window():
    b = _b(10, 6)
    x = torch.zeros(0, 11)
    y = ops.sparse_delta(x, b, seed=SEED, col_start=3, in_features=50)
    assert y.shape == (0, 10)


# ---- h reaches saved_tensors_hooks ----------------------------------------------------------

def test_saved_tensors_hooks_see_h_of_lori_linear():
    """LoRILinear under grad saves h = x @ A^T (T x rank, fp32) with save_for_backward, so a
    pack hook (activation offload / checkpointing) sees it, and the backward uses what the
    unpack hook returns."""
    torch.manual_seed(0)
    T, n_in, n_out, rank = 6, 48, 24, 8
    layer = L.LoRILinear.from_linear(torch.nn.Linear(n_in, n_out), rank=rank, alpha=16, seed=5)
    ad = next(iter(layer.adapters.values()))
    with torch.no_grad():
        ad.values.normal_()
    x = torch.randn(T, n_in, requires_grad=True)
    packed, unpacked = [], []

    def pack(t):
        packed.append((tuple(t.shape), t.dtype))
        return t.clone()  # offload stand-in: the backward must read this copy

    def unpack(t):
        unpacked.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = layer(x)
    assert ((T, rank), torch.float32) in packed, packed
    y.square().sum().backward()
    assert (T, rank) in unpacked, unpacked
    gx, gv = x.grad.clone(), ad.values.grad.clone()
    x.grad = None
    ad.values.grad = None
    layer(x).square().sum().backward()  # no hooks: same gradients
    torch.testing.assert_close(x.grad, gx, rtol=0, atol=0)
    torch.testing.assert_close(ad.values.grad, gv, rtol=0, atol=0)

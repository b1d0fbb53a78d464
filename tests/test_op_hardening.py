"""The C++ CPU kernels refuse what they cannot compute right, and compute right what they
accept: every tensor argument's device, scale's range, out_features == 0, single rounding of
sums, and the sign dot of Rademacher A with inf/NaN and near-overflow inputs on every ISA.

The device tests call the CPU kernels directly (a redispatch to the CPU key): a meta tensor
among the arguments would otherwise route the call to the fake kernels."""
import contextlib

import pytest
import torch

import lori_kernels as L
from lori_kernels import reference
from lori_kernels.testing import random_packed

ISAS = ["avx512", "avx2", "generic"]
CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def isa_available(level):
    """Whether this CPU runs `level` (the level never rises above what the CPU has)."""
    torch.ops.lori._set_cpu_isa(level)
    return torch.ops.lori._set_cpu_isa("auto") == level


@contextlib.contextmanager
def isa(level):
    if not isa_available(level):
        pytest.skip(f"this CPU has no {level} (its path cannot run here)")
    torch.ops.lori._set_cpu_isa(level)
    try:
        yield
    finally:
        torch.ops.lori._set_cpu_isa("auto")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- every tensor argument's device, checked in the kernels ---------------------------------

def _delta_args(T=3, inp=40, out=20, rank=8):
    g = _gen(1)
    b = random_packed(out, rank, generator=g)
    return [torch.randn(T, inp, generator=g), b.mask, b.values, b.offsets, rank, 1,
            "rademacher", 1.0]


def _batched_args(T=4, inp=40, out=20, rank=8, n=3):
    g = _gen(2)
    bs = [random_packed(out, rank, generator=g) for _ in range(n)]
    values = torch.cat([b.values for b in bs])
    starts = torch.tensor([0] + [b.values.numel() for b in bs][:-1]).cumsum(0)
    return [torch.randn(T, inp, generator=g), torch.tensor([0, 2, -1, 1][:T]),
            torch.stack([b.mask for b in bs]), values, starts.long(),
            torch.stack([b.offsets for b in bs]), torch.arange(n, dtype=torch.long) + 7,
            torch.full((n,), 0.5), torch.tensor([1, 2, 1][:n], dtype=torch.int32), rank]


def _on_meta(args, i):
    a = list(args)
    a[i] = a[i].to("meta")
    return a


def _cpu_call(op, args):
    return op.redispatch(CPU_KEYS, *args)


DELTA_TENSORS = {0: "x", 1: "mask", 2: "values", 3: "offsets"}


@pytest.mark.parametrize("i", sorted(DELTA_TENSORS))
@pytest.mark.parametrize("name", ["sparse_delta", "sparse_delta_fwd"])
def test_forward_kernels_check_every_device(name, i):
    op = getattr(torch.ops.lori, name).default
    with pytest.raises(RuntimeError, match=" is on (meta|cpu) but x is on (cpu|meta)"):
        _cpu_call(op, _on_meta(_delta_args(), i))


@pytest.mark.parametrize("i", [0, 1, 2, 3, 4, 11])
def test_backward_kernel_checks_every_device(i):
    x, mask, values, offsets, rank, seed, dist, scale = _delta_args()
    h = torch.zeros(x.shape[0], rank)
    args = [torch.ones(x.shape[0], 20), x, mask, values, offsets, rank, seed, dist, scale,
            True, True, h]
    with pytest.raises(RuntimeError, match=" is on (meta|cpu) but x is on (cpu|meta)"):
        _cpu_call(torch.ops.lori.sparse_delta_backward.default, _on_meta(args, i))


def test_backward_kernel_rejects_an_empty_h_on_another_device():
    """An empty h means "not saved", but it is still an argument: on meta it is an error."""
    x, mask, values, offsets, rank, seed, dist, scale = _delta_args()
    args = [torch.ones(x.shape[0], 20), x, mask, values, offsets, rank, seed, dist, scale,
            True, True, torch.empty(0, device="meta")]
    with pytest.raises(RuntimeError, match="h is on meta but x is on cpu"):
        _cpu_call(torch.ops.lori.sparse_delta_backward.default, args)


@pytest.mark.parametrize("i", [0, 1, 2, 3])
def test_merge_kernel_checks_every_device_and_leaves_weight_alone(i):
    _, mask, values, offsets, rank, seed, dist, scale = _delta_args()
    w = torch.randn(20, 40, generator=_gen(3))
    w0 = w.clone()
    args = [w, mask, values, offsets, rank, seed, dist, scale]
    with pytest.raises(RuntimeError, match=" is on (meta|cpu) but x is on (cpu|meta)"):
        _cpu_call(torch.ops.lori.merge_delta_.default, _on_meta(args, i))
    assert torch.equal(w, w0)


@pytest.mark.parametrize("i", list(range(9)) + [10])
def test_batched_kernel_checks_every_device(i):
    args = _batched_args() + [torch.zeros(4, 20)]  # base
    with pytest.raises(RuntimeError, match=" is on (meta|cpu) but x is on (cpu|meta)"):
        _cpu_call(torch.ops.lori.batched_sparse_delta.default, _on_meta(args, i))


@pytest.mark.parametrize("i", list(range(10)))
def test_batched_backward_kernel_checks_every_device(i):
    a = _batched_args()
    args = [torch.ones(4, 20)] + a + [True, True]
    with pytest.raises(RuntimeError, match=" is on (meta|cpu) but x is on (cpu|meta)"):
        _cpu_call(torch.ops.lori.batched_sparse_delta_backward.default, _on_meta(args, i))


# ---- scale: finite and representable in the accumulation dtype ------------------------------

BAD_FP32_SCALES = [float("inf"), -float("inf"), float("nan"), 1e39, -1e39, 1e-39, -1e-300]


def _scaled(args, scale, dtype=torch.float32):
    a = list(args)
    a[0] = a[0].to(dtype)
    a[2] = a[2].to(dtype)
    a[7] = scale
    return a


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", BAD_FP32_SCALES)
def test_scale_outside_float32_is_an_error(scale, dtype):
    a = _scaled(_delta_args(), scale, dtype)
    for call in (lambda: torch.ops.lori.sparse_delta(*a),
                 lambda: torch.ops.lori.sparse_delta_fwd(*a),
                 lambda: torch.ops.lori.sparse_delta_backward(
                     torch.ones(3, 20, dtype=dtype), *a, True, True)):
        with pytest.raises(ValueError, match="scale"):
            call()
    w = torch.randn(20, 40).to(dtype)
    w0 = w.clone()
    with pytest.raises(ValueError, match="scale"):
        torch.ops.lori.merge_delta_(w, *a[1:])
    assert torch.equal(w, w0)


@pytest.mark.parametrize("scale", [float("inf"), float("nan")])
def test_nonfinite_scale_is_an_error_in_float64(scale):
    a = _scaled(_delta_args(), scale, torch.float64)
    with pytest.raises(ValueError, match="scale must be finite"):
        torch.ops.lori.sparse_delta(*a)


@pytest.mark.parametrize("scale", [1e39, 1e-39, 0.0, -0.0])
def test_float64_accumulates_any_finite_scale(scale):
    a = _scaled(_delta_args(), scale, torch.float64)
    y = torch.ops.lori.sparse_delta(*a)
    b = L.PackedB(a[1], a[2], a[3], a[4])
    ref = reference.sparse_delta(a[0], b.to_dense(), 1, "rademacher", scale)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("scale", [0.0, 1.1754944e-38, 3.4e38])
def test_float32_edge_scales_are_accepted(scale):
    torch.ops.lori.sparse_delta(*_scaled(_delta_args(), scale))


@pytest.mark.parametrize("scale", [float("inf"), float("nan")])
def test_batched_nonfinite_scale_of_a_used_adapter_is_an_error(scale):
    a = _batched_args()
    a[7] = torch.tensor([0.5, scale, 0.5])
    with pytest.raises(ValueError, match="scales\\[1\\] = .* is not finite"):
        torch.ops.lori.batched_sparse_delta(*a)
    with pytest.raises(ValueError, match="scales\\[1\\] = .* is not finite"):
        torch.ops.lori.batched_sparse_delta_backward(torch.ones(4, 20), *a, True, True)
    a[1] = torch.tensor([0, 2, -1, 0])  # adapter 1 unused: its scale is never applied
    torch.ops.lori.batched_sparse_delta(*a)


# ---- out_features == 0 ----------------------------------------------------------------------

@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("T", [1, 5, 40])
def test_forward_with_no_output_rows_returns_h(level, dtype, T):
    g = _gen(4)
    x = torch.randn(T, 70, generator=g).to(dtype)
    b = random_packed(0, 8, generator=g, dtype=dtype)
    with isa(level):
        y, h = torch.ops.lori.sparse_delta_fwd(x, b.mask, b.values, b.offsets, 8, 3, "uniform", 2.0)
    assert y.shape == (T, 0)
    a = reference.random_a(3, 8, 70, "uniform").double()
    ref = x.double() @ a.T
    assert h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-5)


# ---- single rounding ------------------------------------------------------------------------

def _rounding_misses(got, exact64):
    """Entries of got (bf16) that differ from exact64 rounded once to bf16. fp32 arithmetic
    before that one rounding moves an entry only when exact64 is within ~1e-7 relative of a
    rounding boundary, so a handful at most; rounding twice moves a large fraction."""
    return int((got != exact64.to(got.dtype)).sum())


def test_batched_backward_rounds_a_shared_value_range_once():
    T, inp, out, rank = 48, 64, 96, 16
    g = _gen(5)
    b = random_packed(out, rank, density=0.5, generator=g, dtype=torch.bfloat16)
    x = torch.randn(T, inp, generator=g).to(torch.bfloat16)
    gy = torch.randn(T, out, generator=g).to(torch.bfloat16)
    ids = torch.arange(T) % 2
    # Two ids alias one B (same value range), with different A's and scales.
    args = [x, ids, torch.stack([b.mask, b.mask]), b.values, torch.zeros(2, dtype=torch.long),
            torch.stack([b.offsets, b.offsets]), torch.tensor([11, 12]), torch.tensor([0.7, 1.3]),
            torch.tensor([1, 2], dtype=torch.int32), rank]
    _, gv = torch.ops.lori.batched_sparse_delta_backward(gy, *args, False, True)
    exact = torch.zeros(b.values.numel(), dtype=torch.float64)
    for a, (seed, dist, sc) in enumerate([(11, "rademacher", 0.7), (12, "uniform", 1.3)]):
        rows = ids == a
        A = reference.random_a(seed, rank, inp, dist).double()
        h = x[rows].double() @ A.T
        gb = gy[rows].double().T @ h * sc
        exact += gb[b.bool_mask()]
    assert gv.dtype == torch.bfloat16
    assert _rounding_misses(gv, exact) <= max(2, exact.numel() // 1000)


@pytest.mark.parametrize("level", ISAS)
def test_batched_forward_with_base_rounds_once(level):
    T, inp, out, rank = 32, 64, 128, 16
    g = _gen(6)
    bs = [random_packed(out, rank, density=0.5, generator=g, dtype=torch.bfloat16) for _ in range(2)]
    x = torch.randn(T, inp, generator=g).to(torch.bfloat16)
    base = (3 * torch.randn(T, out, generator=g)).to(torch.bfloat16)
    ids = torch.arange(T) % 2
    n0 = bs[0].values.numel()
    args = [x, ids, torch.stack([b.mask for b in bs]), torch.cat([b.values for b in bs]),
            torch.tensor([0, n0]), torch.stack([b.offsets for b in bs]), torch.tensor([21, 22]),
            torch.tensor([0.9, 1.1]), torch.tensor([2, 1], dtype=torch.int32), rank]
    with isa(level):
        y = torch.ops.lori.batched_sparse_delta(*args, base)
    exact = base.double().clone()
    for a, (seed, dist, sc) in enumerate([(21, "uniform", 0.9), (22, "rademacher", 1.1)]):
        rows = ids == a
        A = reference.random_a(seed, rank, inp, dist).double()
        exact[rows] += (x[rows].double() @ A.T) @ bs[a].to_dense().double().T * sc
    assert _rounding_misses(y, exact) <= max(2, exact.numel() // 1000)


# ---- the Rademacher sign dot: inf/NaN and near-overflow inputs ------------------------------

def _h_and_reference(x, rank, seed):
    b = random_packed(8, rank, generator=_gen(7))
    _, h = torch.ops.lori.sparse_delta_fwd(x, b.mask, b.values, b.offsets, rank, seed,
                                           "rademacher", 1.0)
    a = reference.random_a(seed, rank, x.shape[1], "rademacher").double()
    # The fp64 reference rounded to fp32 (values beyond fp32's range are its inf).
    return h, (x.double() @ a.T).float(), x.double().abs() @ a.abs().T


def _same_nonfinite_pattern_and_close(h, ref, absdot, n):
    assert torch.equal(torch.isnan(h), torch.isnan(ref)), "NaN pattern differs"
    assert torch.equal(torch.isposinf(h), torch.isposinf(ref)), "+inf pattern differs"
    assert torch.equal(torch.isneginf(h), torch.isneginf(ref)), "-inf pattern differs"
    fin = torch.isfinite(ref)
    # fp32 summation of n exact terms: error <= n eps sum |x_j a_j|.
    bound = n * torch.finfo(torch.float32).eps * absdot[fin] + 1e-30
    assert bool(((h[fin].double() - ref[fin].double()).abs() <= bound).all())


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("T", [1, 3, 4, 5, 16])
@pytest.mark.parametrize("inp", [70, 256])
def test_sign_dot_with_inf_and_nan(level, T, inp):
    g = _gen(8)
    x = torch.randn(T, inp, generator=g)
    x[0, 5] = float("inf")
    x[T - 1, inp - 2] = -float("inf")  # the tail of the row
    if T > 2:
        x[1, 40] = float("nan")
    with isa(level):
        h, ref, absdot = _h_and_reference(x, 24, 9)
    _same_nonfinite_pattern_and_close(h, ref, absdot, inp)


@pytest.mark.parametrize("level", ISAS)
@pytest.mark.parametrize("T", [1, 4, 6])
def test_sign_dot_near_float32_max(level, T):
    """Two entries of 0.75 * FLT_MAX, whose plain sum overflows: rows of A whose two signs
    differ must give 0 (exactly for the sign-flip paths, within fp32 error for the GEMM). Rows whose signs agree hold 1.5 * FLT_MAX * magnitude: finite,
    but a path that sums +-x in fp32 before scaling overflows there, to the right signed inf
    (the vector paths do; the generic path scales first), never NaN."""
    inp, rank, seed = 96, 32, 10
    big = 0.75 * torch.finfo(torch.float32).max
    x = torch.zeros(T, inp)
    x[:, 3] = big
    x[:, 70] = big
    with isa(level):
        h, ref, absdot = _h_and_reference(x, rank, seed)
    a = reference.random_a(seed, rank, inp, "rademacher")
    differ = torch.sign(a[:, 3]) != torch.sign(a[:, 70])
    assert differ.any() and (~differ).any()
    cancel = h[:, differ].double()
    assert bool((cancel.abs() <= inp * torch.finfo(torch.float32).eps * absdot[:, differ]).all()), \
        "opposite signs must cancel to 0 (within fp32 summation error)"
    agree = h[:, ~differ]
    want = ref[:, ~differ]
    assert not torch.isnan(agree).any()
    overflowed = torch.isinf(agree)
    assert torch.equal(torch.sign(agree[overflowed]), torch.sign(want[overflowed]))
    fin = ~overflowed
    bound = inp * torch.finfo(torch.float32).eps * absdot[:, ~differ][fin]
    assert bool(((agree[fin].double() - want[fin].double()).abs() <= bound).all())


@pytest.mark.parametrize("T", [1, 2, 4])
def test_avx512_decode_backward_inf_matches_avx2(T):
    """grad_x from A's sign bits (the AVX-512 decode backward) with an inf in grad_y gives the
    AVX2 path's non-finite pattern and, elsewhere, its values within fp32 summation error."""
    if not isa_available("avx512"):
        pytest.skip("this CPU has no avx512 (its path cannot run here)")
    g = _gen(11)
    rank, inp, out = 32, 300, 90
    b = random_packed(out, rank, density=0.3, generator=g)
    x = torch.randn(T, inp, generator=g)
    gy = torch.randn(T, out, generator=g)
    row = int(b.bool_mask().sum(1).argmax())
    gy[0, row] = float("inf")
    args = (gy, x, b.mask, b.values, b.offsets, rank, 4, "rademacher", 1.0, True, True)
    with isa("avx2"):
        gx2, gv2 = torch.ops.lori.sparse_delta_backward(*args)
    with isa("avx512"):
        gx5, gv5 = torch.ops.lori.sparse_delta_backward(*args)
    for got, want in ((gx5, gx2), (gv5, gv2)):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(torch.isposinf(got), torch.isposinf(want))
        assert torch.equal(torch.isneginf(got), torch.isneginf(want))
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)

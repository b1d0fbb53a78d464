"""Property tests over every op (hypothesis, bounded and deterministic: derandomized, no
example database, no shrinking). Valid calls must match the pure-PyTorch references within
the tolerance rule (random_a bit for bit); invalid ones must raise ValueError / TypeError /
RuntimeError naming the argument, in this process (it must survive them all). The cases live
in tests/fuzz_cases.py; `make fuzz` runs many more of them in child processes.

Failures waiting on a fix outside the Python layer are xfail(strict=True) with the reason, so
they flip to failures (and get unmarked) when the fix lands."""
import collections

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import fuzz_cases as C

COUNTS = collections.Counter()

BOUNDED = settings(deadline=None, derandomize=True, database=None, max_examples=20,
                   phases=(Phase.explicit, Phase.generate),
                   suppress_health_check=list(HealthCheck))


class HypoDraw:
    """fuzz_cases' draw interface over hypothesis data (so examples shrink and print)."""

    def __init__(self, data):
        self.data = data

    def int(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))

    def choice(self, seq):
        return self.data.draw(st.sampled_from(seq))


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    c = COUNTS
    print(f"\nfuzz ops (bounded): calls tried {sum(c[o] for o in C.OUTCOMES)}, ok {c['ok']}, clean errors "
          f"{c['clean_error']}, silent wrong {c['silent_wrong']}, unclear errors "
          f"{c['unclear_error']}, false rejections {c['false_reject']}; of the failures, known "
          f"and xfail(strict) {c['pending']}")


def _run(case, expect):
    outcome, detail = C.run_case(case)
    COUNTS[outcome] += 1
    if outcome != expect and (C.pending_reason(case) or _always_pending(case["op"],
                                                                         case["mutation"])):
        COUNTS["pending"] += 1
    assert outcome == expect, f"{outcome}: {detail}\ncase: {case}"


@pytest.mark.parametrize("op", C.ALL_OPS)
@BOUNDED
@given(data=st.data())
def test_valid_calls_match_reference(op, data):
    case = C.build_case(HypoDraw(data), op=op, backend="cpp", valid=True)
    assume(C.pending_reason(case) is None)
    _run(case, "ok")


def _always_pending(op, mut):
    """(op, mutation) pairs that fail on every example today, with the reason."""
    return None


_PAIRS = [pytest.param(op, m, marks=[pytest.mark.xfail(strict=True, reason=r)] if r else [],
                       id=f"{op}-{m}")
          for op in C.ALL_OPS for m in C.mutations(op) for r in [_always_pending(op, m)]]


@pytest.mark.parametrize("op, mutation", _PAIRS)
@settings(BOUNDED, max_examples=4)
@given(data=st.data())
def test_invalid_calls_raise_clearly(op, mutation, data):
    """Every mutation of every op (meta on each tensor argument, bad scale, dtypes, shapes,
    rank, distribution, corrupt B, out-of-range ids...), through the C++ path."""
    case = C.build_case(HypoDraw(data), op=op, backend="cpp", mutation=mutation)
    if not _always_pending(op, mutation):
        assume(C.pending_reason(case) is None)
    expect = "ok" if mutation == "meta:h" and 0 in case["tokens"] else "clean_error"
    _run(case, expect)


@pytest.mark.parametrize("op", C.TRITON_OPS)
@settings(BOUNDED, max_examples=6)
@given(data=st.data())
def test_triton_backend(op, data):
    """The Triton backend (interpreted here, so few examples): valid and invalid alike."""
    case = C.build_case(HypoDraw(data), op=op, backend="triton")
    assume(C.pending_reason(case) is None)
    expect = "ok" if case["mutation"] == "none" else "clean_error"
    _run(case, expect)


def _case(**kw):
    base = dict(op="op.sparse_delta", backend="cpp", mutation="none", dtype="float32", **{
        "in": 16}, out=5, rank=4, tokens=(3,), density="0.5", dist="rademacher", seed=1,
        scale=1.0, noncontig=False, isa="auto", tseed=0, adapters=2, base=False,
        need=(True, True), with_h=False, cols=(0, 16), bad=0)
    base.update(kw)
    return base


def test_valid_edge_cases():
    """out_features == 0, empty batches, non-contiguous inputs, both distributions, fp64
    scale beyond fp32's range: each against the reference."""
    cases = [_case(out=0), _case(tokens=(0,)), _case(tokens=(2, 0)), _case(noncontig=True),
             _case(op="op.merge_delta_", noncontig=True), _case(op="merge_delta_", out=0),
             _case(op="op.sparse_delta_backward", tokens=(0,), with_h=True),
             _case(op="op.sparse_delta_backward", out=0),
             _case(op="op.batched_sparse_delta", tokens=(0,)),
             _case(op="op.batched_sparse_delta_backward", tokens=(0,)),
             _case(op="batched_sparse_delta", noncontig=True, base=True),
             _case(dtype="float64", scale=1e39), _case(dist="uniform", seed=2 ** 64 - 1),
             _case(op="random_a", rank=0), _case(op="op.random_a", cols=(7, 7))]
    for case in cases:
        _run(case, "ok")


def test_fwd_h_with_no_outputs():
    _run(_case(op="op.sparse_delta_fwd", out=0), "ok")


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 1e39, 1e-46])
@pytest.mark.parametrize("op", ["sparse_delta", "merge_delta_"])
def test_bad_scale_through_triton_raises(op, scale):
    """The Triton host checks (lori_kernels.rules) reject it, as the C++ ones do."""
    case = _case(op=op, backend="triton", mutation="scale",
                 bad=[float("inf"), float("-inf"), float("nan"), 1e39, -1e39, 1e-46].index(
                     scale) if scale == scale else 2)
    _run(case, "clean_error")


@pytest.mark.xfail(strict=True, reason="C++ sparse_delta_backward skips the h check when there "
                                       "is nothing to compute")
def test_backward_checks_h_with_no_tokens():
    _run(_case(op="op.sparse_delta_backward", tokens=(0,), mutation="h_shape"), "clean_error")


@pytest.mark.xfail(strict=True, reason="C++ skips B's contents check when there is nothing to "
                                       "compute")
def test_corrupt_b_with_no_tokens():
    _run(_case(tokens=(0,), mutation="corrupt_offsets"), "clean_error")


def test_meta_mixed_in_every_tensor_argument():
    """A meta tensor among CPU ones on each tensor argument of each op raises naming it (the
    fakes check every device); never uninitialised memory."""
    tried = 0
    for op in C.ALL_OPS:
        for m in C.mutations(op):
            if m.startswith("meta:"):
                _run(_case(op=op, mutation=m, base=True, with_h=True), "clean_error")
                tried += 1
    assert tried == sum(len(C._TENSOR_ARGS[o]) for o in C._TENSOR_ARGS)

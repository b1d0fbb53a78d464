"""Fuzz cases for every op, shared by the property tests (tests/test_fuzz_ops.py, where
hypothesis draws them) and the deep run (tests/fuzz_driver.py, where a seeded random.Random
does, so a case replays from its number).

A case is a dict of plain values (printable, replayable): build_case(draw) makes one,
run_case(case) runs it and returns (outcome, detail):
  ok            a valid call matched the pure-PyTorch reference (within the tolerance rule;
                random_a bit for bit)
  clean_error   an invalid call raised ValueError/TypeError/RuntimeError naming the argument
  silent_wrong  a valid call returned a wrong answer, or an invalid one returned at all
  unclear_error an invalid call raised another type, or without naming the argument
  false_reject  a valid call raised
"""
from __future__ import annotations

import math
import random

import torch

import lori_kernels as L
from lori_kernels import ops as O
from lori_kernels import reference, spec
from lori_kernels.testing import (assert_within_rule, baseline_grads, dense_lora_baseline,
                                  random_packed, reference_grads)

ops = torch.ops.lori
OUTCOMES = ("ok", "clean_error", "silent_wrong", "unclear_error", "false_reject")
CLEAN = (ValueError, TypeError, RuntimeError)
DTYPES = ("float32", "bfloat16", "float16", "float64")

SINGLE_OPS = ("sparse_delta", "op.sparse_delta", "op.sparse_delta_fwd", "merge_delta_",
              "op.merge_delta_", "op.sparse_delta_backward")
BATCHED_OPS = ("batched_sparse_delta", "op.batched_sparse_delta",
               "op.batched_sparse_delta_backward")
RANDOM_A_OPS = ("random_a", "op.random_a")
ALL_OPS = SINGLE_OPS + BATCHED_OPS + RANDOM_A_OPS
TRITON_OPS = ("sparse_delta", "merge_delta_", "batched_sparse_delta", "random_a")

_TENSOR_ARGS = {
    "sparse_delta": ("x", "mask", "values", "offsets"),
    "op.sparse_delta": ("x", "mask", "values", "offsets"),
    "op.sparse_delta_fwd": ("x", "mask", "values", "offsets"),
    "merge_delta_": ("weight", "mask", "values", "offsets"),
    "op.merge_delta_": ("weight", "mask", "values", "offsets"),
    "op.sparse_delta_backward": ("grad_y", "x", "mask", "values", "offsets", "h"),
    "batched_sparse_delta": ("x", "adapter_ids", "base"),
    "op.batched_sparse_delta": ("x", "adapter_ids", "masks", "values", "value_starts",
                                "offsets", "seeds", "scales", "distributions", "base"),
    "op.batched_sparse_delta_backward": ("grad_y", "x", "adapter_ids", "masks", "values",
                                         "value_starts", "offsets", "seeds", "scales",
                                         "distributions"),
}
_SINGLE_BAD = ("scale", "values_dtype", "mask_shape", "offsets_shape", "rank", "distribution",
               "corrupt_offsets", "in_features_0")
_MUTATIONS = {
    **{op: _SINGLE_BAD for op in SINGLE_OPS},
    "op.sparse_delta_backward": _SINGLE_BAD + ("grad_y_shape", "h_shape"),
    "merge_delta_": _SINGLE_BAD[:-1] + ("weight_rows", "weight_3d"),
    "op.merge_delta_": _SINGLE_BAD[:-1] + ("weight_rows", "weight_3d"),
    "batched_sparse_delta": ("ids_range", "ids_len", "base_shape", "pool_scale"),
    "op.batched_sparse_delta": ("ids_range", "ids_len", "base_shape", "values_dtype",
                                "rank", "scales_inf"),
    "op.batched_sparse_delta_backward": ("ids_range", "ids_len", "grad_y_shape",
                                         "values_dtype", "rank", "scales_inf"),
    "random_a": ("rank", "in_features_0", "columns", "distribution", "seed"),
    "op.random_a": ("rank", "in_features_0", "columns", "distribution"),
}
# what the error must name, per mutation (meta:<arg> names <arg>)
_NAMES = {"scale": "scale", "values_dtype": "values", "mask_shape": "mask",
          "offsets_shape": "offsets", "rank": "rank", "distribution": "distribution",
          "corrupt_offsets": ("offsets", "values"), "in_features_0": "in_features", "grad_y_shape": "grad_y",
          "h_shape": "h", "weight_rows": "weight", "weight_3d": "weight",
          "ids_range": "adapter_ids", "ids_len": "adapter_ids", "base_shape": "base",
          "pool_scale": "scale", "scales_inf": "scales", "columns": "columns", "seed": "seed"}


def mutations(op: str) -> tuple[str, ...]:
    return tuple(f"meta:{a}" for a in _TENSOR_ARGS.get(op, ())) + _MUTATIONS[op]


def pending_reason(case: dict) -> str | None:
    """Why a case's failure is known and waiting on a fix outside these files (the suite marks
    those xfail(strict=True); the deep run counts them apart)."""
    cpp = case["backend"] == "cpp"
    if case["mutation"] == "scales_inf" and 0 in case["tokens"]:
        # by design: the batched ops check the scales of the adapters the tokens use, and
        # with no token no adapter is used (the empty result is right)
        return "no token uses the adapter whose scale is bad"
    if case["op"] == "op.sparse_delta_backward" and case["mutation"] == "h_shape" and (
            0 in case["tokens"] or case["out"] == 0 or case["need"] == (False, False)):
        return "C++ sparse_delta_backward skips the h check when there is nothing to compute"
    if case["mutation"] == "corrupt_offsets" and cpp and case["op"] in (
            "op.sparse_delta", "sparse_delta", "op.sparse_delta_fwd",
            "op.sparse_delta_backward") and (
            0 in case["tokens"] or (case["op"] == "op.sparse_delta_backward"
                                    and case["need"] == (False, False))):
        return "C++ skips B's contents check when there is nothing to compute"
    return None


class RandomDraw:
    """The draw interface over random.Random (the deep run)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq):
        return seq[self.rng.randrange(len(seq))]


def build_case(d, *, op: str | None = None, backend: str | None = None,
               mutation: str | None = None, valid: bool | None = None) -> dict:
    """One case from a draw interface d (int(lo, hi), choice(seq)); op / backend / mutation
    fixed when given; valid=True draws no mutation, valid=False always one."""
    op = op or d.choice(ALL_OPS)
    if backend is None:
        backend = d.choice(("cpp", "cpp", "cpp", "triton")) if op in TRITON_OPS else "cpp"
    if mutation is None:
        if valid is None:
            valid = d.int(0, 1) == 0
        mutation = "none" if valid else d.choice(mutations(op))
    dtype = d.choice(DTYPES)
    rank = d.int(1, 40)
    case = {
        "op": op, "backend": backend, "mutation": mutation, "dtype": dtype,
        "in": d.int(1, 70), "out": d.choice((0, 1, 5, 64, 65, 130)), "rank": rank,
        "tokens": d.choice(((0,), (1,), (3,), (2, 3), (7,))),
        "density": d.choice(("zeros", "ones", "0.1", "0.5")),
        "dist": d.choice(("rademacher", "uniform")),
        "seed": d.choice((0, 1, 2 ** 63, 2 ** 64 - 1, d.int(0, 2 ** 64 - 1))),
        "scale": d.choice((1.0, -0.5, 2.0, 0.0, 1e-3, 17.0)),
        "noncontig": d.int(0, 1) == 1, "isa": d.choice(("auto", "generic")),
        "tseed": d.int(0, 2 ** 31 - 1), "adapters": d.int(1, 4), "base": d.int(0, 1) == 1,
        "need": d.choice(((True, True), (True, False), (False, True))),
        "with_h": d.int(0, 1) == 1, "cols": (d.int(0, 70), d.int(0, 70)),
        "bad": d.int(0, 7),
    }
    if dtype == "float64" and d.int(0, 3) == 0:
        case["scale"] = 1e39  # finite in float64's accumulation: valid there
    if op in RANDOM_A_OPS:
        case["rank"] = d.int(0, 40)
    if op in BATCHED_OPS and case["out"] == 0:
        case["out"] = 5
    return case


def _dt(name):
    return getattr(torch, name)


def _strided(t: torch.Tensor, g) -> torch.Tensor:
    """The same values in a non-contiguous tensor (every other element of a wider buffer)."""
    if t.dim() == 0 or t.numel() == 0:
        return t
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


class Expect(Exception):
    """Raised inside a case to report its outcome early."""


def _scale_bad(case):
    vals = [math.inf, -math.inf, math.nan]
    if case["dtype"] != "float64":
        vals += [1e39, -1e39, 1e-46]
    return vals[case["bad"] % len(vals)]


def run_case(case: dict) -> tuple[str, str]:
    prev_isa = O.set_cpu_isa(case["isa"])
    try:
        return _run(case)
    finally:
        O.set_cpu_isa(prev_isa)


def _run(case):
    mut = case["mutation"]
    # an empty saved h means "recompute" (schema): on meta or not, it is not read
    valid = mut == "none" or (mut == "meta:h" and 0 in case["tokens"])
    name = mut[5:] if mut.startswith("meta:") else _NAMES.get(mut, mut)
    try:
        check = _call(case)
    except CLEAN as e:
        if valid:
            return "false_reject", f"{type(e).__name__}: {e}"[:300]
        msg = str(e)
        if not any(n in msg for n in ((name,) if isinstance(name, str) else name)):
            return "unclear_error", f"does not name {name!r}: {type(e).__name__}: {msg}"[:300]
        return "clean_error", msg[:200]
    except Exception as e:  # noqa: BLE001
        return ("false_reject" if valid else "unclear_error"), f"{type(e).__name__}: {e}"[:300]
    if not valid:
        return "silent_wrong", f"invalid input ({mut}) returned without an error"
    try:
        check()
    except AssertionError as e:
        return "silent_wrong", str(e)[:300]
    except Exception as e:  # noqa: BLE001 - the check itself failed: report, never pass
        return "silent_wrong", f"the check raised {type(e).__name__}: {e}"[:300]
    return "ok", ""


def _call(case):
    """Build the case's arguments, make the call, return a closure that checks the result."""
    op, mut = case["op"], case["mutation"]
    g = torch.Generator().manual_seed(case["tseed"])
    dt = _dt(case["dtype"])
    if op in RANDOM_A_OPS:
        return _random_a(case)
    if op in BATCHED_OPS:
        return _batched(case, g, dt)
    return _single(case, g, dt)


def _meta(mut, nm, t):
    return t.to("meta") if t is not None and mut == f"meta:{nm}" else t


def _single(case, g, dt):
    op, mut, r = case["op"], case["mutation"], case["rank"]
    n_in, out = case["in"], case["out"]
    dens = case["density"]
    b = random_packed(out, r, float(dens) if dens[0] == "0" and dens != "zeros" else 0.1,
                      dtype=dt, generator=g, mask=dens if dens in ("zeros", "ones") else "random")
    seed, dist, scale = case["seed"], case["dist"], case["scale"]
    x = torch.randn(*case["tokens"], n_in, generator=g).to(dt)
    weight = torch.randn(out, n_in, generator=g).to(dt)
    gy = torch.randn(*case["tokens"], out, generator=g).to(dt)
    if case["noncontig"]:
        x, weight, gy = _strided(x, g), _strided(weight, g), _strided(gy, g)
        b = b.with_values(_strided(b.values, g))
    mask, values, offsets, rank = b.mask, b.values, b.offsets, r
    if mut == "scale":
        scale = _scale_bad(case)
    elif mut == "values_dtype":
        values = values.to(torch.float64 if dt != torch.float64 else torch.float32)
    elif mut == "mask_shape":
        mask = torch.zeros(out, spec.mask_words(r) + 1, dtype=torch.int32)
    elif mut == "offsets_shape":
        offsets = torch.cat([offsets, offsets[-1:]])
    elif mut == "rank":
        rank = (0, 257, -1)[case["bad"] % 3]
    elif mut == "distribution":
        dist = ("normal", "", "Rademacher")[case["bad"] % 3]
    elif mut == "corrupt_offsets":
        offsets = offsets.clone()
        offsets[-1] += 1
        values = torch.cat([values, values.new_zeros(1)])
    elif mut == "in_features_0":
        x = x[..., :0]
    elif mut == "weight_rows":
        weight = torch.randn(out + 1, n_in, generator=g).to(dt)
    elif mut == "weight_3d":
        weight = weight[None]
    elif mut == "grad_y_shape":
        gy = torch.randn(*case["tokens"], out + 1, generator=g).to(dt)
    x, weight, gy = _meta(mut, "x", x), _meta(mut, "weight", weight), _meta(mut, "grad_y", gy)
    mask, values = _meta(mut, "mask", mask), _meta(mut, "values", values)
    offsets = _meta(mut, "offsets", offsets)
    seed_op = spec.check_seed(seed)
    packed = L.packing.PackedB(mask, values, offsets, rank)
    backend = case["backend"]
    dense = b.to_dense()

    def ref_y():
        xr = x.contiguous()
        return reference.sparse_delta(xr, dense, seed, dist, scale), \
            dense_lora_baseline(xr, b, seed, dist, scale)

    if op in ("sparse_delta", "op.sparse_delta"):
        y = (L.sparse_delta(x, packed, seed=seed, distribution=dist, scale=scale,
                            backend=backend) if op == "sparse_delta" else
             ops.sparse_delta(x, mask, values, offsets, rank, seed_op, dist, scale))
        return lambda: assert_within_rule(y, *ref_y(), what=op)
    if op == "op.sparse_delta_fwd":
        y, h = ops.sparse_delta_fwd(x, mask, values, offsets, rank, seed_op, dist, scale)

        def check():
            assert_within_rule(y, *ref_y(), what="sparse_delta_fwd y")
            a = reference.random_a(seed, r, n_in, dist)
            xt = x.reshape(-1, n_in)
            h64 = xt.double() @ a.double().T
            hb = xt.to(h.dtype) @ a.to(h.dtype).T
            assert_within_rule(h, h64, hb, what="sparse_delta_fwd h")
        return check
    if op in ("merge_delta_", "op.merge_delta_"):
        w0 = weight.clone() if weight.device.type != "meta" else None
        try:
            if op == "merge_delta_":
                L.merge_delta_(weight, packed, seed=seed, distribution=dist, scale=scale,
                               backend=backend)
            else:
                ops.merge_delta_(weight, mask, values, offsets, rank, seed_op, dist, scale)
        except CLEAN:
            if w0 is not None and not torch.equal(weight, w0):
                raise AssertionError("a merge_delta_ that raised changed the weight") from None
            raise

        def check():
            a = reference.random_a(seed, r, n_in, dist)
            ref64 = w0.double() + (dense.double() @ a.double()) * scale
            base = w0 + (dense @ a.to(dt)) * scale
            assert_within_rule(weight, ref64, base, what=op)
        return check
    if op == "op.sparse_delta_backward":
        need_x, need_v = case["need"]
        h = None
        if case["with_h"] or mut in ("h_shape", "meta:h"):
            hdt = torch.float64 if dt == torch.float64 else torch.float32
            a = reference.random_a(seed, r, n_in, dist)
            h = (x.reshape(-1, n_in).to(hdt) @ a.to(hdt).T) if mut != "in_features_0" and \
                x.device.type != "meta" else None
            if mut == "h_shape":
                h = torch.zeros(max(1, h.shape[0] if h is not None else 1) + 1, r, dtype=hdt)
            h = _meta(mut, "h", h)
        gx, gv = ops.sparse_delta_backward(gy, x, mask, values, offsets, rank, seed_op, dist,
                                           scale, need_x, need_v, h)

        def check():
            rx, rv = reference_grads(x, b, seed, dist, scale, gy)
            bx, bv = baseline_grads(x.contiguous(), b, seed, dist, scale, gy.contiguous())
            if need_x:
                assert_within_rule(gx, rx, bx, what="grad_x")
            else:
                assert gx.numel() == 0, "grad_x returned though not needed"
            if need_v:
                assert_within_rule(gv, rv, bv, what="grad_values")
            else:
                assert gv.numel() == 0, "grad_values returned though not needed"
        return check
    raise AssertionError(f"unknown op {op}")


def _batched(case, g, dt):
    op, mut, r = case["op"], case["mutation"], case["rank"]
    n_in, out = case["in"], case["out"]
    pool = L.AdapterPool(n_in, out, r, dtype=dt)
    n = case["adapters"]
    for i in range(n):
        dens = (0.0, 0.1, 0.5, 1.0)[(case["bad"] + i) % 4]
        p = random_packed(out, r, dens, dtype=dt, generator=g)
        sc = case["scale"] if case["scale"] != 1e39 else 3.0
        if mut == "pool_scale" and i == 0:
            sc = _scale_bad(case)
        pool.add(f"a{i}", p, seed=(case["seed"] + i) % 2 ** 64,
                 distribution=("rademacher", "uniform")[i % 2], scale=sc)
    x = torch.randn(*case["tokens"], n_in, generator=g).to(dt)
    tokens = x.numel() // n_in
    ids = torch.randint(-1, n, (tokens,), generator=g)
    with_base = case["base"] or mut in ("meta:base", "base_shape")
    base = torch.randn(*case["tokens"], out, generator=g).to(dt) if with_base else None
    gy = torch.randn(*case["tokens"], out, generator=g).to(dt)
    if case["noncontig"]:
        x, gy = _strided(x, g), _strided(gy, g)
        base = _strided(base, g) if base is not None else None
    masks, values, starts, offsets, seeds, scales, dists, rank = pool.op_args()
    if mut == "ids_range":
        ids = ids.clone() if tokens else torch.zeros(0, dtype=torch.int64)
        if tokens:
            ids[case["bad"] % tokens] = (n + 5, -2, pool.capacity)[case["bad"] % 3]
        else:
            ids = torch.full((1,), n + 5)
            x = torch.randn(1, n_in).to(dt)  # one token so the id is read
            gy = torch.randn(1, out).to(dt)
            base = None
    elif mut == "ids_len":
        ids = torch.zeros(tokens + 1, dtype=torch.int64)
    elif mut == "base_shape":
        base = torch.zeros(*case["tokens"], out + 1, dtype=dt)
    elif mut == "grad_y_shape":
        gy = torch.zeros(*case["tokens"], out + 1, dtype=dt)
    elif mut == "values_dtype":
        values = values.to(torch.float64 if dt != torch.float64 else torch.float32)
    elif mut == "rank":
        rank = (0, 257, r + 32)[case["bad"] % 3]
    elif mut == "scales_inf":
        scales = scales.clone()
        scales[0] = (math.inf, math.nan, -math.inf)[case["bad"] % 3]
        ids = torch.zeros_like(ids)  # every token on adapter 0, the one with the bad scale
    t = dict(x=x, adapter_ids=ids, masks=masks, values=values, value_starts=starts,
             offsets=offsets, seeds=seeds, scales=scales, distributions=dists, base=base,
             grad_y=gy)
    t = {k: _meta(mut, k, v) for k, v in t.items()}
    args = [t[k] for k in ("x", "adapter_ids", "masks", "values", "value_starts", "offsets",
                           "seeds", "scales", "distributions")]

    def ref(compute, xx, vv, bb):
        return reference.batched_sparse_delta(xx, ids, masks, vv, starts, offsets, seeds, scales,
                                              dists, r, bb, compute_dtype=compute)

    if op == "batched_sparse_delta":
        y = L.batched_sparse_delta(t["x"], t["adapter_ids"], pool, base=t["base"],
                                   backend=case["backend"])
    elif op == "op.batched_sparse_delta":
        y = ops.batched_sparse_delta(*args, rank, t["base"])
    else:
        need_x, need_v = case["need"]
        gx, gv = ops.batched_sparse_delta_backward(t["grad_y"], *args, rank, need_x, need_v)

        def check_bwd():
            res = []
            for compute in (torch.float64, dt):
                xx = x.detach().to(compute).requires_grad_()
                vv = values.detach().to(compute).requires_grad_()
                y = ref(compute, xx, vv, None)
                grads = torch.autograd.grad(y, (xx, vv), gy.to(compute), allow_unused=True) \
                    if y.requires_grad else (None, None)
                res.append(tuple(torch.zeros_like(w) if gr is None else gr
                                 for w, gr in zip((xx, vv), grads)))
            (rx, rv), (bx, bv) = res
            if need_x:
                assert_within_rule(gx, rx, bx, what="batched grad_x")
            if need_v:
                assert_within_rule(gv, rv, bv, what="batched grad_values")
        return check_bwd

    def check():
        ref64 = ref(torch.float64, x, values, base)
        assert_within_rule(y, ref64, ref(dt, x, values, base), what=op)
    return check


def _random_a(case):
    op, mut = case["op"], case["mutation"]
    r, n_in, dist, seed = case["rank"], case["in"], case["dist"], case["seed"]
    dt = _dt(case["dtype"])
    c0, c1 = sorted(v % (n_in + 1) for v in case["cols"])
    if mut == "rank":
        # torch's schema parser takes True as an int: the bool check is the wrapper's
        r = (-1, -5, True if op == "random_a" else -2)[case["bad"] % 3]
    elif mut == "in_features_0":
        n_in, c0, c1 = 0, 0, 0
    elif mut == "columns":
        c0, c1 = ((c1 + 1, c1), (0, n_in + 1), (-1, 1))[case["bad"] % 3]
    elif mut == "distribution":
        dist = "normal"
    elif mut == "seed":
        seed = (-1, 2 ** 64, True)[case["bad"] % 3]
    if op == "random_a":
        a = L.random_a(seed, r, n_in, distribution=dist, dtype=dt, columns=(c0, c1),
                       backend=case["backend"])
    else:
        a = ops.random_a(spec.check_seed(seed), r, n_in, dist, c0, c1, dtype=dt)

    def check():
        ref = reference.random_a(seed, r, n_in, dist, dtype=dt, col_start=c0, col_end=c1)
        assert a.dtype == ref.dtype and a.shape == ref.shape, (a.dtype, a.shape, ref.shape)
        assert torch.equal(a, ref), "random_a differs from the reference bit for bit"
    return check

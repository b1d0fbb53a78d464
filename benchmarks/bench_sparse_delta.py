"""sparse_delta vs dense LoRA (what users write: two F.linear calls, A and B dense, same dtype)
and vs torch.sparse (x @ A^T, then B as a CSR matrix), at the op level: the delta only.

Each case checks once, untimed, that every provider computes the same delta (the tolerance
rule of lori_kernels.testing) before timing them: a baseline that computes something else
would make the ratio meaningless.
"""
from __future__ import annotations

import torch

import lori_kernels as L
from lori_kernels import reference
from lori_kernels.testing import assert_within_rule, random_packed

from .harness import EXTRAS, bench

SEED = 1234
SCALE = 2.0
RANK = 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def forward_params(quick: bool):
    """(dtype, T, in, out, distributions) of the forward cases."""
    if quick:
        return [(d, T, 4096, 4096, ("rademacher", "uniform") if T == 1 else ("rademacher",))
                for d in DTYPES for T in (1, 16)]
    out = []
    for d in DTYPES:
        for inp, o in [(4096, 4096), (4096, 14336)]:
            for T in (1, 16, 256, 2048):
                if o == 14336 and T == 2048 and d == "bf16":
                    continue  # dense bf16 at this size takes seconds per call on CPUs without AMX
                dists = ("rademacher", "uniform") if (T in (1, 256) and o == 4096) else ("rademacher",)
                out.append((d, T, inp, o, dists))
    return out


def fwd_bwd_params(quick: bool):
    return [(d, T) for d in DTYPES for T in ((16,) if quick else (1, 16, 256, 2048))]


def timing(quick: bool) -> dict:
    return {"min_time": 0.05, "min_reps": 3, "warmup": 1} if quick else {}


def pytest_generate_tests(metafunc):
    quick = metafunc.config.getoption("--bench-quick")
    if metafunc.function.__name__ == "test_forward":
        ps = forward_params(quick)
        metafunc.parametrize("case", ps, ids=[f"{d}-T{T}-{i}x{o}" for d, T, i, o, _ in ps])
    elif metafunc.function.__name__ == "test_fwd_bwd":
        ps = fwd_bwd_params(quick)
        metafunc.parametrize("case", ps, ids=[f"{d}-T{T}-4096x4096" for d, T in ps])


def _setup(T, inp, out, rank, dtype, dist, density=0.1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, inp, generator=g).to(dtype)
    b = random_packed(out, rank, density=density, dtype=dtype, generator=g)
    a_dense = L.random_a(SEED, rank, inp, distribution=dist, dtype=dtype)
    b_dense = b.to_dense()
    return x, b, a_dense, b_dense


def _csr(x, a, b_dense):
    """x @ A^T dense, then B (out x rank) as torch's CSR; None and the reason where torch has
    no kernel for this dtype on this CPU (bf16 CSR @ dense goes to MKL, which has none)."""
    csr = b_dense.to_sparse_csr()
    try:
        (csr @ torch.nn.functional.linear(x[:1], a).T).T
    except (RuntimeError, NotImplementedError) as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return (lambda: (csr @ torch.nn.functional.linear(x, a).T).T * SCALE), None


def test_forward(benchmark, case, quick):
    dname, T, inp, out, dists = case
    dtype = DTYPES[dname]
    x, b, a, bd = _setup(T, inp, out, RANK, dtype, dists[0])
    fns = {"dense_lora": lambda: reference.dense_lora(x, a, bd, SCALE)}
    unsupported = {}
    csr, why = _csr(x, a, bd)
    if csr is None:
        unsupported["torch_csr"] = why
    else:
        fns["torch_csr"] = csr
    for d in dists:
        fns[f"lori_{d}"] = (lambda d=d: L.sparse_delta(x, b, seed=SEED, distribution=d, scale=SCALE))
    with torch.no_grad():
        for i, d in enumerate(dists):
            ad = L.random_a(SEED, RANK, inp, distribution=d, dtype=torch.float64)
            ref64 = reference.dense_lora(x.double(), ad, bd.double(), SCALE)
            base = reference.dense_lora(x, ad.to(dtype), bd, SCALE)
            assert_within_rule(fns[f"lori_{d}"](), ref64, base, f"lori_{d} {case}")
            if i == 0 and csr is not None:  # the CSR baseline uses the first distribution's A
                assert_within_rule(fns["torch_csr"](), ref64, base, f"torch_csr {case}")
        bench(benchmark, fns, baseline="dense_lora", **timing(quick),
              info={"suite": "op", "pass": "forward", "dtype": dname, "T": T, "in": inp,
                    "out": out, "rank": RANK, "unsupported": unsupported})


def test_fwd_bwd(benchmark, case, quick):
    dname, T = case
    dtype = DTYPES[dname]
    dist = "rademacher"
    x, b, a, bd = _setup(T, 4096, 4096, RANK, dtype, dist)
    x = x.requires_grad_()
    bdp = bd.clone().requires_grad_()         # dense LoRA trains all of B
    vals = b.values.clone().requires_grad_()  # LoRI trains B's pattern entries only
    bb = b.with_values(vals)
    gy = torch.randn(T, 4096, generator=torch.Generator().manual_seed(1)).to(dtype)

    def dense():
        x.grad = bdp.grad = None
        reference.dense_lora(x, a, bdp, SCALE).backward(gy)

    def ours():
        x.grad = vals.grad = None
        L.sparse_delta(x, bb, seed=SEED, distribution=dist, scale=SCALE).backward(gy)

    bench(benchmark, {"dense_lora": dense, f"lori_{dist}": ours}, baseline="dense_lora",
          **timing(quick),
          info={"suite": "op", "pass": "fwd+bwd", "dtype": dname, "T": T, "in": 4096,
                "out": 4096, "rank": RANK,
                "unsupported": {"torch_csr": "no gradient to CSR values through torch.sparse mm"}})


def test_a_generation(benchmark, quick, rank=RANK, inp=4096):
    fns = {d: (lambda d=d: L.random_a(SEED, rank, inp, distribution=d)) for d in L.DISTRIBUTIONS}
    bench(benchmark, fns, **timing(quick),
          info={"suite": "a_generation", "dtype": "fp32", "rank": rank, "in": inp})


def test_adapter_bytes(inp=4096, out=4096, rank=RANK, density=0.1):
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        b = random_packed(out, rank, density=density, dtype=dtype,
                          generator=torch.Generator().manual_seed(0))
        dense_bf16 = (rank * inp + out * rank) * 2
        mask, values, offsets = (b.mask.numel() * 4, b.values.numel() * b.values.element_size(),
                                 b.offsets.numel() * 4)
        assert mask + values + offsets == b.nbytes, "PackedB.nbytes is not its three parts"
        rows.append({"values_dtype": str(dtype).replace("torch.", ""), "in": inp, "out": out,
                     "rank": rank, "sparsity": 1 - density, "ours_bytes": b.nbytes,
                     "mask_bytes": mask, "values_bytes": values, "offsets_bytes": offsets,
                     "dense_bf16_lora_bytes": dense_bf16, "ratio": b.nbytes / dense_bf16})
    EXTRAS["adapter_bytes"] = rows

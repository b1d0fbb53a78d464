"""One adapted layer, base matmul included: LoRILinear (LoRI-S, B 90% sparse) vs the bare
nn.Linear it wraps vs PEFT's LoRA layer (peft.tuners.lora.Linear, same base, rank, alpha).

in = out = 4096, rank 32, alpha 64, no bias, same dtype for base and adapter. The three
providers share one base weight. Forward under no_grad at decode sizes (T = 1, 16: where the
adapter's fixed cost shows against the base matmul); fwd+bwd at T = 16 (gradients to x and to
the adapter's trainable parameters, base frozen, as in fine-tuning). Quick mode: T = 1 only.
"""
from __future__ import annotations

import torch
from torch import nn

import lori_kernels as L
from lori_kernels.testing import assert_within_rule, random_packed

from .harness import bench

IN = OUT = 4096
RANK = 32
ALPHA = 64.0
SEED = 1234
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def pytest_generate_tests(metafunc):
    quick = metafunc.config.getoption("--bench-quick")
    name = metafunc.function.__name__
    if name == "test_layer_forward":
        ps = [(d, T) for d in DTYPES for T in ((1,) if quick else (1, 16))]
    elif name == "test_layer_fwd_bwd":
        ps = [("fp32", 1)] if quick else [(d, 16) for d in DTYPES]
    else:
        return
    metafunc.parametrize("case", ps, ids=[f"{d}-T{T}-{IN}x{OUT}" for d, T in ps])


def layers(dtype):
    """(bare nn.Linear, LoRILinear around it, PEFT lora.Linear around it), B nonzero."""
    import peft
    from peft.tuners.lora import Linear as PeftLinear

    g = torch.Generator().manual_seed(0)
    base = nn.Linear(IN, OUT, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(OUT, IN, generator=g) / IN ** 0.5)
    base = base.to(dtype).requires_grad_(False)
    ours = L.LoRILinear.from_linear(base, rank=RANK, alpha=ALPHA, seed=SEED, dtype=dtype)
    b = random_packed(OUT, RANK, density=0.1, dtype=dtype, generator=g)
    ours.adapters["default"].set_pattern(b.to_dense() != 0, b.to_dense())
    # B values of exactly 0 would drop out of the != 0 mask; random normal values are never 0.
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0)
    theirs = PeftLinear(base, "default", cfg, r=RANK, lora_alpha=ALPHA, lora_dropout=0.0)
    theirs = theirs.to(dtype)
    with torch.no_grad():
        theirs.lora_B["default"].weight.copy_(torch.randn(OUT, RANK, generator=g).to(dtype) * 0.01)
    return base, ours, theirs


def test_layer_forward(benchmark, case, quick):
    dname, T = case
    dtype = DTYPES[dname]
    base, ours, theirs = layers(dtype)
    x = torch.randn(T, IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        ad = ours.adapters["default"]
        a64 = ad.materialize_a(torch.float64)
        ref64 = x.double() @ base.weight.double().T + (x.double() @ a64.T) @ ad.dense_b().double().T * ad.scale
        assert_within_rule(ours(x), ref64, base(x) + (x @ a64.to(dtype).T) @ ad.dense_b().T * ad.scale,
                           f"LoRILinear {case}")
        fns = {"nn_linear": lambda: base(x), "lori_linear": lambda: ours(x),
               "peft_lora": lambda: theirs(x)}
        kw = {"min_time": 0.05, "min_reps": 3, "warmup": 1} if quick else {"min_time": 1.5}
        bench(benchmark, fns, baseline="nn_linear", **kw,
              info={"suite": "layer", "pass": "forward", "dtype": dname, "T": T, "in": IN,
                    "out": OUT, "rank": RANK})


def test_layer_fwd_bwd(benchmark, case, quick):
    dname, T = case
    dtype = DTYPES[dname]
    base, ours, theirs = layers(dtype)
    x = torch.randn(T, IN, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    gy = torch.randn(T, OUT, generator=torch.Generator().manual_seed(2)).to(dtype)
    params = {"lori_linear": [p for p in ours.parameters() if p.requires_grad],
              "peft_lora": [p for p in theirs.parameters() if p.requires_grad]}
    if not params["lori_linear"] or not params["peft_lora"]:
        raise AssertionError(f"no trainable adapter parameters: { {k: len(v) for k, v in params.items()} }")

    def step(layer, ps):
        def fn():
            x.grad = None
            for p in ps:
                p.grad = None
            layer(x).backward(gy)
        return fn

    fns = {"nn_linear": step(base, []), "lori_linear": step(ours, params["lori_linear"]),
           "peft_lora": step(theirs, params["peft_lora"])}
    kw = {"min_time": 0.05, "min_reps": 3, "warmup": 1} if quick else {"min_time": 1.5}
    bench(benchmark, fns, baseline="nn_linear", **kw,
          info={"suite": "layer", "pass": "fwd+bwd", "dtype": dname, "T": T, "in": IN,
                "out": OUT, "rank": RANK})

"""Model-level multi-adapter serving: decode steps of a small Llama with many resident LoRI
adapters (ServingModel, adapter_names per sequence) vs PEFT's mixed-batch inference and vs
the base model alone, timed in the same run (benchmarks.harness.compare, interleaved).

Model: LlamaConfig hidden 1024, intermediate 2816, 4 layers, 16 heads / 4 KV heads, vocab
8192, random weights, fp32; adapters on all 7 projections, rank 16, B 90% sparse (LoRI) /
dense rank-16 LoRA (PEFT, same rank). One decode step = one token per sequence against a KV
cache of PREFIX tokens (cropped back after every step, so every step sees the same length).
Cases: batch 8 / 32 / 64 (quick: 32), resident adapters 1 / 8 / 64 / 512 (quick: 1 / 64),
popularity mixes distinct / uniform / zipf1.5 / identical. Providers:
  base          the plain HF model (no adapter layers at all);
  lori_serving  ServingModel(model, targets), one plan per step for every layer;
  peft_mixed    PeftModel with the same number of resident LoRA adapters, adapter_names=...
                (not run at 512 resident: loading 512 PEFT adapters takes too long here;
                its step cost depends on the batch's distinct adapters, not the resident count);
  lori_single   (identical mix only) a LoRILinear model with that one adapter.
Also: adapters resident per GiB, the Python cost of one model plan vs one per layer, and the
step latencies while an adapter is added from another thread (vs one adapter's copy time).
`run(quick)` returns a dict; `report(data)` renders it as markdown. In the suite
(`benchmarks.run`), test_serving stores that dict as the JSON's lori.serving and report.md
carries its report; `smoke` (benchmarks.run --smoke, the smoke test) is one setup of 4
resident adapters at batch 8, every provider and extra, to keep the smoke run short.
"""
from __future__ import annotations

import copy
import statistics
import threading
import time

import torch

import lori_kernels as L
from lori_kernels.testing import random_packed

from .harness import compare, machine

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 1024, 2816, 4, 16, 4, 8192
RANK, ALPHA, DENSITY = 16, 32.0, 0.1
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = 16
MIXES = ["distinct", "uniform", "zipf1.5", "identical"]


def _base_model(seed=0):
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                   num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                   num_key_value_heads=KV_HEADS, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg).eval()


def _lori_adapter(sm, k, patterns):
    """Adapter k for every served layer (patterns cycled, seeds distinct: distinct A's)."""
    out = {}
    for i, (n, layer) in enumerate(sm.layers.items()):
        b = patterns[n][k % len(patterns[n])]
        out[n] = dict(b=b, seed=10_000 * k + i + 1, distribution="rademacher",
                      scale=ALPHA / RANK)
    return out


class _Setup:
    def __init__(self, resident: int, peft: bool):
        self.base = _base_model()
        self.sm = L.ServingModel(copy.deepcopy(self.base), TARGETS, rank=RANK,
                                 capacity=max(8, resident))
        g = torch.Generator().manual_seed(1)
        self.patterns = {n: [random_packed(layer.out_features, RANK, density=DENSITY,
                                           generator=g) for _ in range(8)]
                         for n, layer in self.sm.layers.items()}
        for k in range(resident):
            self.sm.add_adapter(f"a{k}", _lori_adapter(self.sm, k, self.patterns))
        self.resident = resident
        self.pm = None
        if peft:
            import peft as peft_lib

            cfg = peft_lib.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                      lora_dropout=0.0, init_lora_weights=False)
            self.pm = peft_lib.get_peft_model(copy.deepcopy(self.base), cfg,
                                              adapter_name="a0").eval()
            for k in range(1, resident):
                self.pm.add_adapter(f"a{k}", cfg)
        # one LoRILinear model with adapter a0 (what "one adapter for all" is held against)
        self.single = copy.deepcopy(self.base)
        L.inject(self.single, TARGETS, rank=RANK, alpha=ALPHA, seed=7)
        with torch.no_grad():
            for name, layer in L.workflow.lori_layers(self.single).items():
                b = self.patterns[name][0]
                layer.adapters["default"].set_pattern(b.bool_mask(), b.values, phase="sparse")


def _names(mix, B, n, g):
    if mix == "identical":
        ks = [0] * B
    elif mix == "distinct":
        ks = (torch.randperm(max(B, n), generator=g)[:B] % n).tolist()
    elif mix == "uniform":
        ks = torch.randint(0, n, (B,), generator=g).tolist()
    else:
        p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.5
        ks = torch.multinomial(p / p.sum(), B, replacement=True, generator=g).tolist()
    return [f"a{k}" for k in ks]


def _decoder(model, B, call):
    """A decode-step callable: one token per sequence on a PREFIX-long KV cache."""
    ids = torch.randint(0, VOCAB, (B, PREFIX), generator=torch.Generator().manual_seed(B))
    with torch.no_grad():
        cache = call(model, ids, None).past_key_values
    tok = ids[:, -1:]

    def step():
        with torch.no_grad():
            out = call(model, tok, cache)
        cache.crop(-1)  # back to PREFIX tokens
        return out
    return step


def _fwd(**extra):
    return lambda m, ids, cache: m(input_ids=ids, past_key_values=cache, use_cache=True,
                                   **extra)


def case(st, B, mix, min_time):
    g = torch.Generator().manual_seed(B * 31 + len(mix))
    names = _names(mix, B, st.resident, g)
    fns = {"base": _decoder(st.base, B, _fwd()),
           "lori_serving": _decoder(st.sm, B, _fwd(adapter_names=names))}
    if st.pm is not None:
        fns["peft_mixed"] = _decoder(st.pm, B, _fwd(adapter_names=names))
    if mix == "identical":
        fns["lori_single"] = _decoder(st.single, B, _fwd())
    res = compare(fns, min_time=min_time, min_reps=5, warmup=2)
    return res, len(set(names))


def adapters_per_gib(st):
    ours = st.sm.adapter_nbytes("a0")
    dense = sum(RANK * (lyr.in_features + lyr.out_features) * 2 for lyr in st.sm.layers.values())
    return {"ours_bytes": ours, "ours_per_gib": 2**30 // ours, "dense_bf16_bytes": dense,
            "dense_bf16_per_gib": 2**30 // dense}


def plan_cost(st, B=32, reps=200):
    """Python-side cost per step: one model plan vs resolving the ids in every layer."""
    names = [f"a{k % st.resident}" for k in range(B)]
    layers = list(st.sm.layers.values())
    t0 = time.perf_counter()
    for _ in range(reps):
        st.sm.plan(names)
    one = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        for layer in layers:
            layer.pool.plan(names)
    per_layer = (time.perf_counter() - t0) / reps
    return {"layers": len(layers), "model_plan_us": one * 1e6, "per_layer_plans_us": per_layer * 1e6}


def add_while_serving(st, B=32, steps=60):
    """Step latencies of a serving thread while the main thread adds one adapter, vs the
    steps before; and what copying one adapter's bytes costs (the target's yardstick)."""
    names = _names("distinct", B, st.resident, torch.Generator().manual_seed(5))
    step = _decoder(st.sm, B, _fwd(adapter_names=names))
    for _ in range(3):
        step()
    quiet = []
    for _ in range(15):
        t0 = time.perf_counter()
        step()
        quiet.append(time.perf_counter() - t0)
    lat, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            t0 = time.perf_counter()
            step()
            lat.append((t0, time.perf_counter() - t0))

    th = threading.Thread(target=serve)
    th.start()
    time.sleep(3 * statistics.median(quiet))
    ad = _lori_adapter(st.sm, 99_999, st.patterns)
    a0 = time.perf_counter()
    st.sm.add_adapter("new", ad)
    a1 = time.perf_counter()
    time.sleep(3 * statistics.median(quiet))
    stop.set()
    th.join()
    during = [d for t, d in lat if t < a1 and t + d > a0]
    st.sm.delete_adapter("new")
    # one adapter's copy: its tensors, copied once (what an add must at least do)
    tensors = [t for d in ad.values() for t in (d["b"].mask, d["b"].values, d["b"].offsets)]
    t0 = time.perf_counter()
    for _ in range(5):
        [t.clone() for t in tensors]
    copy_s = (time.perf_counter() - t0) / 5
    return {"B": B, "resident": st.resident, "quiet_median_ms": statistics.median(quiet) * 1e3,
            "quiet_max_ms": max(quiet) * 1e3, "add_ms": (a1 - a0) * 1e3,
            "steps_during_add": len(during),
            "max_step_during_add_ms": max(during) * 1e3 if during else None,
            "one_adapter_copy_ms": copy_s * 1e3}


def run(quick: bool = False, log=print, smoke: bool = False) -> dict:
    batches = [8] if smoke else [32] if quick else [8, 32, 64]
    residents = [4] if smoke else [1, 64] if quick else [1, 8, 64, 512]
    min_time = 0.05 if smoke else 0.3 if quick else 1.5
    extras_at = 4 if smoke else 64
    rows, extra = [], {}
    for n in residents:
        t0 = time.time()
        st = _Setup(n, peft=n <= 64)
        log(f"serving setup: {n} resident adapters ({time.time() - t0:.0f}s)")
        for B in batches:
            for mix in MIXES:
                if n == 1 and mix != "identical":
                    continue  # one resident adapter: every mix is "identical"
                res, distinct = case(st, B, mix, min_time)
                for prov, r in res.items():
                    rows.append({"bench": "serving", "resident": n, "B": B, "mix": mix,
                                 "distinct": distinct, "provider": prov,
                                 "tokens_per_s": B / (r["median_us"] * 1e-6), **r})
                log(f"serving resident={n} B={B} {mix} ({distinct} distinct): " + ", ".join(
                    f"{p} {v['median_us'] / 1e3:.1f}ms" for p, v in res.items()))
        if n == extras_at:
            extra["adapters_per_gib"] = adapters_per_gib(st)
            extra["plan_cost"] = plan_cost(st)
            extra["add_while_serving"] = add_while_serving(st)
            log(f"serving extras: {extra}")
        del st
    return {"machine": machine(), "rows": rows, **extra}


def _isa(m: dict) -> str:
    flags = [k for k, v in (m.get("isa_flags") or {}).items() if v]
    return f"{' '.join(flags) or 'no listed ISA flags'}; lori path {m.get('lori_cpu_isa', '?')}"


def report(data: dict) -> str:
    m = data["machine"]
    by = {}
    for r in data["rows"]:
        by.setdefault((r["resident"], r["B"], r["mix"], r["distinct"]), {})[r["provider"]] = r
    lines = [f"Model-level serving (Llama hidden {HIDDEN}, {LAYERS} layers, 7 projections, rank "
             f"{RANK}, fp32), decode step on a {PREFIX}-token cache. Machine: {m['cpu']} "
             f"({_isa(m)}), {m['cores']} cores, torch {m['torch']} ({m['threads']} threads), git {m['git']}, "
             f"{m['date']}. Medians (ms) of interleaved runs; ratios vs the same run.", "",
             "| resident | batch | mix | distinct | base | lori_serving | tok/s | vs base | "
             "peft_mixed | lori / peft | lori_single | lori / single |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (n, B, mix, dist), d in by.items():
        ours, base = d["lori_serving"]["median_us"], d["base"]["median_us"]
        cells = [f"{base / 1e3:.1f}", f"{ours / 1e3:.1f}", f"{d['lori_serving']['tokens_per_s']:.0f}",
                 f"{ours / base:.3f}"]
        for p in ("peft_mixed", "lori_single"):
            if p in d:
                v = d[p]["median_us"]
                cells += [f"{v / 1e3:.1f}", f"{ours / v:.3f}"]
            else:
                cells += ["-", "-"]
        lines.append(f"| {n} | {B} | {mix} | {dist} | " + " | ".join(cells) + " |")
    if "adapters_per_gib" in data:
        a = data["adapters_per_gib"]
        lines += ["", f"Adapters resident per GiB (all 7 projections x {LAYERS} layers): LoRI "
                      f"pool {a['ours_per_gib']} ({a['ours_bytes']} B each, fp32 values) vs dense "
                      f"bf16 LoRA {a['dense_bf16_per_gib']} ({a['dense_bf16_bytes']} B)."]
    if "plan_cost" in data:
        p = data["plan_cost"]
        lines.append(f"Python id work per step: one model plan {p['model_plan_us']:.0f} us vs a "
                     f"plan per layer {p['per_layer_plans_us']:.0f} us ({p['layers']} layers); "
                     "every layer's op takes the step's plan instead of grouping the tokens again.")
    if "add_while_serving" in data:
        a = data["add_while_serving"]
        mx = a["max_step_during_add_ms"]
        lines.append(f"Adding one adapter while serving (B={a['B']}, {a['resident']} resident): add "
                     f"took {a['add_ms']:.1f} ms; steps before: median {a['quiet_median_ms']:.1f} ms, "
                     f"max {a['quiet_max_ms']:.1f} ms; {a['steps_during_add']} steps overlapped the "
                     f"add, the longest {mx if mx is None else round(mx, 1)} ms; one adapter's copy: "
                     f"{a['one_adapter_copy_ms']:.2f} ms.")
    return "\n".join(lines) + "\n"


def test_serving(quick, smoke):
    """The suite's hook (benchmarks/run.py): the JSON round trip fails here, not in the
    JSON writer at the end of the run, if the dict ever holds something JSON cannot store."""
    import json

    from .harness import EXTRAS

    EXTRAS["serving"] = json.loads(json.dumps(run(quick, smoke=smoke)))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = run(args.quick)
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    print(report(data))

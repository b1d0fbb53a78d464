"""The benchmark suite: `python -m benchmarks.run [--quick]` (what `make bench` runs).

Writes benchmarks/results/latest.json (all numbers + machine), latest.csv, report.md, and
refreshes the table between the bench markers in README.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time

import torch

from . import bench_batched as bb
from . import bench_sparse_delta as bsd
from .harness import machine

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def log(msg):
    print(msg, flush=True)


def run(quick: bool) -> dict:
    tokens = [1, 16, 256] if quick else [1, 16, 256, 2048]
    rows = []
    for dname, dtype in DTYPES.items():
        for inp, out in [(4096, 4096), (4096, 14336)]:
            for T in tokens:
                if out == 14336 and T == 2048 and dname == "bf16":
                    continue  # dense bf16 at this size takes seconds per call here
                dists = ("rademacher", "uniform") if (T in (1, 256) and out == 4096) else ("rademacher",)
                t0 = time.time()
                res = bsd.forward_cases(T, inp, out, 32, dtype, dists)
                for prov, r in res.items():
                    rows.append({"bench": "forward", "dtype": dname, "T": T, "in": inp, "out": out,
                                 "rank": 32, "provider": prov, **r})
                log(f"forward {dname} T={T} {inp}x{out}: " + ", ".join(
                    f"{k} {v['median_us']:.0f}us" for k, v in res.items()) + f" ({time.time()-t0:.1f}s)")
    for dname, dtype in DTYPES.items():
        for T in tokens:
            t0 = time.time()
            res = bsd.fwd_bwd_cases(T, 4096, 4096, 32, dtype)
            for prov, r in res.items():
                rows.append({"bench": "fwd+bwd", "dtype": dname, "T": T, "in": 4096, "out": 4096,
                             "rank": 32, "provider": prov, **r})
            log(f"fwd+bwd {dname} T={T}: " + ", ".join(
                f"{k} {v['median_us']:.0f}us" for k, v in res.items()) + f" ({time.time()-t0:.1f}s)")
    agen = bsd.a_generation()
    log("A generation: " + ", ".join(f"{k} {v['elements_per_s']/1e9:.2f} Gelem/s" for k, v in agen.items()))
    sizes = bsd.adapter_bytes()
    batched = bb.run(quick, log=log)
    return {"machine": machine(), "rows": rows, "a_generation": agen, "adapter_bytes": sizes,
            "batched": batched}


def ratios(rows):
    """(bench, dtype, T, in, out) -> {provider: median / dense median}."""
    out = {}
    for r in rows:
        key = (r["bench"], r["dtype"], r["T"], r["in"], r["out"])
        out.setdefault(key, {})[r["provider"]] = r["median_us"]
    return {k: {p: v / d["dense_lora"] for p, v in d.items() if p != "dense_lora"} | {"_dense": d["dense_lora"], "_ours": d}
            for k, d in out.items() if "dense_lora" in d}


def report(data) -> str:
    m = data["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores (lori CPU kernels: {m.get('lori_cpu_isa', '?')}), "
             f"torch {m['torch']} ({m['threads']} threads), "
             f"git {m['git']}, {m['date']}. Medians of interleaved runs; ratio = ours / dense LoRA "
             "(two F.linear calls, same dtype) measured in the same run. glibc's mmap threshold "
             "is pinned (`GLIBC_TUNABLES`, see benchmarks/run.py) so large outputs come from "
             "reused heap memory for every provider.", "",
             "| pass | dtype | T | in x out | dense LoRA (us) | LoRI rademacher (us) | ratio | LoRI uniform (us) | ratio |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for (bench, dt, T, inp, out), r in ratios(data["rows"]).items():
        o = r["_ours"]
        uni = (f"{o['lori_uniform']:.0f} | {r['lori_uniform']:.3f}" if "lori_uniform" in o else "- | -")
        lines.append(f"| {bench} | {dt} | {T} | {inp}x{out} | {r['_dense']:.0f} | "
                     f"{o['lori_rademacher']:.0f} | {r['lori_rademacher']:.3f} | {uni} |")
    lines += ["", "| A generation (32 x 4096, fp32) | elements/s | median (us) |", "|---|---:|---:|"]
    for d, v in data["a_generation"].items():
        lines.append(f"| {d} | {v['elements_per_s']/1e9:.2f} G | {v['median_us']:.0f} |")
    lines += ["", "| adapter layer 4096x4096, rank 32, 90% sparse | bytes | vs dense bf16 LoRA A+B |",
              "|---|---:|---:|"]
    for s in data["adapter_bytes"]:
        lines.append(f"| LoRI, {s['values_dtype']} values (mask {s['mask_bytes']} + values "
                     f"{s['values_bytes']} + offsets {s['offsets_bytes']}) | {s['ours_bytes']} | {s['ratio']:.3f} |")
    lines.append(f"| dense bf16 LoRA (A + B) | {data['adapter_bytes'][0]['dense_bf16_lora_bytes']} | 1 |")
    if "batched" in data:
        lines += ["", "Batched multi-adapter (`batched_sparse_delta`):", "", bb.report(data["batched"])]
    return "\n".join(lines) + "\n"


def write(data):
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "latest.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(RESULTS, "latest.csv"), "w", newline="") as f:
        rows = data["rows"] + data.get("batched", {}).get("rows", [])
        fields = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    md = report(data)
    with open(os.path.join(RESULTS, "report.md"), "w") as f:
        f.write("# Benchmark report (CPU)\n\nWritten by `make bench` (python -m benchmarks.run).\n\n" + md)
    if os.path.exists(README):
        text = open(README).read()
        new = re.sub(r"(<!-- bench:begin -->\n).*?(<!-- bench:end -->)",
                     lambda mm: mm.group(1) + md + mm.group(2), text, flags=re.S)
        if new != text:
            open(README, "w").write(new)
    return md


# glibc serves multi-MB allocations (every output here) with fresh mmaps unless its threshold
# has adapted, so runs flip between a page-faulting mode and a reusing one (2.5x apart on the
# dense baseline at T=256). Pinning the thresholds makes every provider reuse heap memory.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"


def main(argv=None):
    if "GLIBC_TUNABLES" not in os.environ:
        os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.run", *(argv or sys.argv[1:])])
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="skip T=2048 (a smoke run)")
    args = ap.parse_args(argv)
    data = run(args.quick)
    print(write(data))


if __name__ == "__main__":
    sys.exit(main())

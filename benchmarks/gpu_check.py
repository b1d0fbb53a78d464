"""Benchmark half of the GPU check, and its report (benchmarks/gpu_check.sh runs the stages).

sparse_delta forward and forward+backward vs dense LoRA on cuBLAS (two F.linear calls,
reference.dense_lora) at in = out = 4096, rank 32, 90% sparsity, T in {1, 16, 256, 4096}, bf16.
Medians (with p20/p80) from triton.testing.do_bench (L2 flushed between runs), or CUDA events
when Triton is missing. Reports achieved GB/s on each provider's compulsory traffic and the
fraction of the memory roofline (the datasheet bandwidth of the named GPU, and a measured
device-to-device copy). Writes one JSON file and prints progress as it goes.

    python benchmarks/gpu_check.py --out R.json --providers cuda,dense     # CUDA + cuBLAS rows
    python benchmarks/gpu_check.py --out R.json --providers triton --merge # Triton rows, own process
    python benchmarks/gpu_check.py --out R.json --update --stages S.tsv    # report only (no torch)
    python benchmarks/gpu_check.py --out R.json --summary                  # the one-line summary
    python benchmarks/gpu_check.py --dry-run ...                           # CPU, small sizes

Providers (--providers, comma-separated): "cuda" (torch.ops.lori.sparse_delta /
sparse_delta_backward and batched_sparse_delta on CUDA tensors), "dense" (dense_cublas and,
for the batched rows, dense_loop and stacked_bmm), "triton" (torch.ops.lori.triton_*). The
shell runs the Triton rows in a process of their own after the CUDA ones, so that a fault in
a Triton kernel (which poisons the CUDA context of its process) cannot cost the CUDA rows;
with --merge a process adds its rows to the JSON already there, and ratios to dense_cublas /
cuda come from the rows of the earlier process. A process that hits a CUDA fault stops timing
(every later call in it would fail) and says so in "errors".
fwd+bwd of the lori providers is the forward op plus the backward op (grad_x and grad_values);
for dense it is autograd through dense_lora with x and B requiring grad (A frozen).

Batched rows (op "batched_fwd"): batched_sparse_delta over a 64-adapter pool, T=64 decode
tokens over 1, 8 and 64 distinct adapters (interleaved) and T=2048 prefill over 8 adapters
(runs of 256), same shape/rank/sparsity/dtype. Each lori batched provider has a sync-free twin
("..._nosync"): by default a batched call validates the ids and pool on the device and reads
the verdict back (one host sync per call), which at decode sizes mostly measures the sync;
the twin turns the check off (lori_kernels.set_validation("off"), every backend). dense_loop is a Python loop of dense LoRA per adapter (the per-adapter token
indices computed outside the timing), stacked_bmm gathers dense A[ids], B[ids] per token.

The JSON always exists once this script has started (written in a finally block, also when
torch, lori_kernels._C or CUDA fail to load): "stages" (from the shell's stage table),
"tests", "device", "results", "errors", "triton_variants" (JIT variants compiled, see
lori_kernels/triton/variants.py) and "summary" (the one line).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SCHEMA = "lori_kernels.gpu_check/2"

# Datasheet HBM bandwidth (GB/s) by device-name substring, most specific first.
PEAK_GBPS = [("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),
             ("GH200", 4000.0), ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0),
             ("A100", 1555.0), ("L40S", 864.0), ("L4", 300.0), ("A10G", 600.0),
             ("RTX 4090", 1008.0), ("B200", 8000.0)]


def log(msg: str) -> None:
    print(f"[gpu_check.py {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip() or None
    except Exception:  # no git or no .git in a copied tree
        return None


def peak_gbps(name: str) -> float | None:
    for key, bw in PEAK_GBPS:
        if key in name:
            return bw
    return None


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
    os.replace(tmp, path)


# ---- timing --------------------------------------------------------------------------------------

def make_timer(device: str, warmup_ms: int = 25, rep_ms: int = 100):
    """fn -> (median, p20, p80) in microseconds."""
    import torch

    if device == "cpu":
        def time_cpu(fn, reps: int = 3):
            fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e6)
            ts.sort()
            return ts[len(ts) // 2], ts[len(ts) // 5], ts[(4 * len(ts)) // 5]
        return time_cpu, "perf_counter (dry run)"
    try:
        from triton.testing import do_bench

        def time_triton(fn):
            q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
            return tuple(v * 1e3 for v in q)
        return time_triton, "triton.testing.do_bench (median, p20, p80; L2 flushed)"
    except ImportError:
        pass
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def time_events(fn, reps: int = max(10, rep_ms // 2)):
        for _ in range(5):
            fn()
        ts = []
        for _ in range(reps):
            flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ts.append(s.elapsed_time(e) * 1e3)
        ts.sort()
        return ts[len(ts) // 2], ts[len(ts) // 5], ts[(4 * len(ts)) // 5]
    return time_events, f"CUDA events (median, p20, p80 of {max(10, rep_ms // 2)}; L2 flushed)"


def measure_copy_gbps(device: str) -> float | None:
    """Device-to-device copy of 2 GiB, bytes read + written per second (GB/s)."""
    import torch

    if device == "cpu":
        return None
    n = 2**30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        b.copy_(a)
    e.record()
    e.synchronize()
    sec = s.elapsed_time(e) / 1e3 / 10
    del a, b
    return 2 * n / sec / 1e9


# ---- traffic models (compulsory bytes) --------------------------------------------------------

def lori_bytes(T, in_f, out_f, packed, esize, with_bwd):
    b_bytes = packed.nbytes
    fwd = T * in_f * esize + T * out_f * esize + b_bytes
    if not with_bwd:
        return fwd
    # backward: reads gy, x (h recomputed), B; writes grad_x and grad_values.
    return fwd + T * out_f * esize + T * in_f * esize + T * in_f * esize + b_bytes + \
        packed.nnz * esize


def dense_bytes(T, in_f, out_f, rank, esize, with_bwd):
    fwd = T * in_f * esize + T * out_f * esize + rank * in_f * esize + out_f * rank * esize
    if not with_bwd:
        return fwd
    # backward: reads gy, x, A, B; writes grad_x and dense grad_B.
    return fwd + T * out_f * esize + 2 * T * in_f * esize + rank * in_f * esize + \
        2 * out_f * rank * esize


# ---- validation switches (sync-free rows) ------------------------------------------------------

# The one validation switch (lori_kernels.validation) off: a batched call skips its
# device-side check and the host sync that reads it back, on every backend.
NOSYNC_ENV = {"LORI_VALIDATE": "off"}


@contextlib.contextmanager
def env_set(values: dict):
    if not values:
        yield
        return
    from lori_kernels import validation

    with validation.validation(values["LORI_VALIDATE"]):
        yield


CUDA_FAULT = re.compile(r"illegal memory access|illegal instruction|misaligned address|"
                        r"unspecified launch failure|device-side assert|CUDA error|"
                        r"AcceleratorError|an illegal|launch timed out", re.I)


class ContextLost(RuntimeError):
    """A CUDA fault: every later CUDA call of this process would fail too."""


def note_error(report: dict, row: dict, e: BaseException, device: str) -> None:
    row["error"] = f"{type(e).__name__}: {e}"[:500]
    if device == "cuda" and CUDA_FAULT.search(row["error"]):
        report["errors"].append(f"CUDA fault in {row['provider']} ({row.get('op')} "
                                f"T={row.get('T')}): {row['error'][:300]}; this process stops "
                                "timing (its CUDA context is lost)")
        raise ContextLost(row["error"])


# ---- batched multi-adapter rows ---------------------------------------------------------------

BATCHED_CASES = [("decode", 64, 1, "interleaved"), ("decode", 64, 8, "interleaved"),
                 ("decode", 64, 64, "interleaved"), ("prefill", 2048, 8, "runs")]
BATCHED_POOL = 64


def run_batched(args, report, device, dtype, feats, rank, add, wanted, deadline) -> None:
    """batched_sparse_delta rows (see the module docstring)."""
    import torch

    import lori_kernels
    from lori_kernels import reference
    from lori_kernels.testing import random_packed

    ops = torch.ops.lori
    timer, _ = make_timer(device, warmup_ms=10, rep_ms=40)
    cases = BATCHED_CASES
    n_pool = BATCHED_POOL
    if args.dry_run:  # CPU: small and quick
        cases, n_pool = [("decode", 16, 1, "interleaved"), ("decode", 16, 4, "interleaved"),
                         ("prefill", 64, 4, "runs")], 4
        if "triton" in wanted:  # the interpreter: one case
            cases = cases[1:2]
    scale = 2.0
    t0 = time.time()
    gen = torch.Generator().manual_seed(1)
    pool = lori_kernels.AdapterPool(feats, feats, rank, dtype=dtype, capacity=n_pool)
    a_dense, b_dense = [], []
    for i in range(n_pool):
        b = random_packed(feats, rank, density=1.0 - args.sparsity, dtype=dtype, generator=gen)
        pool.add(f"a{i}", b, seed=7000 + i, scale=scale)
        a_dense.append(lori_kernels.random_a(7000 + i, rank, feats, dtype=dtype))  # C++ CPU
        b_dense.append(b.to_dense())
    pool.to(device)
    a_all = torch.stack(a_dense).to(device)  # (N, r, in)
    b_all = torch.stack(b_dense).to(device)  # (N, out, r)
    pool_args = pool.op_args()
    log(f"batched: pool of {n_pool} adapters ready in {time.time() - t0:.1f}s")

    providers = {}  # name -> (op, env)
    if "cuda" in wanted:
        name = "cuda_batched" if device == "cuda" else "cpu_batched"
        providers[name] = (ops.batched_sparse_delta, {})
        providers[name + "_nosync"] = (ops.batched_sparse_delta, NOSYNC_ENV)
    if "triton" in wanted:
        why = triton_unavailable(device, args.dry_run)
        if why is None:
            providers["triton_batched"] = (ops.triton_batched_sparse_delta, {})
            providers["triton_batched_nosync"] = (ops.triton_batched_sparse_delta, NOSYNC_ENV)
        else:
            report["errors"].append(f"triton_batched skipped: {why}")

    t_begin = time.time()
    for name, T, k, layout in cases:
        if time.time() - t_begin > args.batched_budget_s or time.time() > deadline:
            report["errors"].append(f"batched budget: skipped {name} T={T} adapters={k} and later")
            break
        g = torch.Generator().manual_seed(T + k)
        ids_cpu = (torch.arange(k).repeat_interleave(T // k) if layout == "runs"
                   else torch.randperm(T, generator=g) % k)
        ids = ids_cpu.to(torch.int32).to(device)
        ids_long = ids_cpu.to(device)
        x = torch.randn(T, feats, generator=g).to(dtype).to(device)
        groups = [(a, (ids_cpu == a).nonzero().flatten().to(device))
                  for a in ids_cpu.unique().tolist()]

        def dense_loop():
            y = torch.zeros(T, feats, dtype=dtype, device=device)
            for a, sel in groups:
                y.index_copy_(0, sel, reference.dense_lora(x[sel], a_all[a], b_all[a], scale))
            return y

        def stacked_bmm():
            h = torch.bmm(a_all[ids_long], x[:, :, None])
            return torch.bmm(b_all[ids_long], h)[:, :, 0] * scale

        with torch.no_grad():
            y_ref = dense_loop()
        ref_max = max(y_ref.float().abs().max().item(), 1e-30)
        fns = []
        if "dense" in wanted:
            fns.append(("dense_loop", dense_loop, {}))
        for prov, (op, env) in list(providers.items()):
            fns.append((prov, lambda op=op: op(x, ids, *pool_args), env))
        if "dense" in wanted:
            fns.append(("stacked_bmm", stacked_bmm, {}))
        for prov, fn, env in fns:
            row = {"op": "batched_fwd", "case": name, "provider": prov, "T": T, "adapters": k,
                   "pool": n_pool, "layout": layout, "in_features": feats, "out_features": feats,
                   "rank": rank, "sparsity": args.sparsity,
                   "dtype": str(dtype).replace("torch.", ""), "distribution": "rademacher",
                   "sync_free": bool(env) or prov in ("dense_loop", "stacked_bmm")}
            try:
                with torch.no_grad(), env_set(env):
                    y = fn()
                    row["max_err_vs_dense_rel"] = \
                        (y.float() - y_ref.float()).abs().max().item() / ref_max
                    med, p20, p80 = timer(fn)
                row.update(median_us=med, p20_us=p20, p80_us=p80)
                log(f"batched {name:7s} T={T:5d} adapters={k:3d} {prov:22s} {med:9.1f} us "
                    f"[{p20:.1f}, {p80:.1f}] err {row['max_err_vs_dense_rel']:.1e}")
            except ContextLost:
                raise
            except Exception as e:
                try:
                    note_error(report, row, e, device)
                finally:
                    add(row)
                log(f"batched {name:7s} T={T:5d} adapters={k:3d} {prov:22s} ERROR {row['error']}")
                if prov.startswith("triton"):  # failing: stop asking
                    providers.pop(prov, None)
                    report["errors"].append(f"{prov} dropped: {row['error']}")
                continue
            add(row)


# ---- the report: stages, tests, ratios, summary -------------------------------------------------

def load_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def skeleton() -> dict:
    return {"schema": SCHEMA, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_sha": git_sha(), "host": platform.node(), "dry_run": False, "stages": [],
            "tests": {}, "device": None, "results": [], "errors": [], "triton_variants": None,
            "summary": None}


def read_stages(path: str | None) -> list[dict]:
    """The shell's stage table: one `name<TAB>status<TAB>seconds<TAB>detail` line per stage."""
    out = []
    if path and os.path.exists(path):
        with open(path, errors="replace") as f:
            for ln in f:
                parts = ln.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    try:
                        sec = float(parts[2])
                    except ValueError:
                        sec = None
                    out.append({"name": parts[0], "status": parts[1], "seconds": sec,
                                "detail": parts[3] if len(parts) > 3 else ""})
    return out


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def parse_pytest_log(path: str) -> dict:
    """Counts, failures and per-test timeouts from one pytest log."""
    info = {"log": os.path.basename(path), "counts": {}, "failed": [], "timeouts": [],
            "collected": None}
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        info["missing"] = True
        return info
    for ln in lines:
        if ln.startswith(("FAILED ", "ERROR ")):
            info["failed"].append(ln[:300])
        elif "Timeout" in ln and "+++" in ln:
            info["timeouts"].append(ln.strip()[:300])
        m = re.match(r"^(\d+)(?:/\d+)? tests? collected", ln.strip())
        if m:
            info["collected"] = int(m.group(1))
    for ln in reversed(lines):  # pytest's final "N passed, M skipped in Xs" line
        if re.search(r"\d+ (passed|failed|skipped|errors?|deselected).* in [\d.]+s", ln):
            for n, what in _COUNT.findall(ln):
                info["counts"][what.rstrip("s") if what.startswith("error") else what] = int(n)
            break
    return info


def variant_counts(path: str | None) -> dict | None:
    """Counts in a LORI_TRITON_VARIANTS file (lori_kernels/triton/variants.py writes it)."""
    data = load_json(path) if path else None
    if not data:
        return None
    keys = {n: len(v) for n, v in sorted(data.get("keys", {}).items())}
    comp = {n: len(v) for n, v in sorted(data.get("compiled", {}).items())}
    return {"keys_total": sum(keys.values()), "compiled_total": sum(comp.values()),
            "keys": keys, "compiled": comp, "processes": data.get("processes")}


def update_report(report: dict, args) -> dict:
    """Fold the shell's stage table, the test logs and the variant counts into the report."""
    if args.stages:
        report["stages"] = read_stages(args.stages)
    for spec in args.tests_log or []:
        name, _, path = spec.partition("=")
        if path:
            report.setdefault("tests", {})[name] = parse_pytest_log(path)
    if args.variants:
        v = variant_counts(args.variants)
        if v is not None:
            report["triton_variants"] = v
    if args.dry_run:
        report["dry_run"] = True
    return report


def _ratio_rows(report: dict) -> None:
    """time_vs_dense / time_vs_cuda on every row, from the rows of all processes."""
    def shape(r):  # rows compare only at the same problem
        return (r["op"], r["T"], r.get("in_features"), r.get("dtype"), r.get("case"),
                r.get("adapters"))
    base = {}
    for r in report["results"]:
        if "median_us" in r and r["provider"] in ("dense_cublas", "cuda", "dense_loop"):
            base[(r["provider"],) + shape(r)] = r["median_us"]
    for r in report["results"]:
        if "median_us" not in r:
            continue
        if r["op"] == "batched_fwd":
            lp = base.get(("dense_loop",) + shape(r))
            if lp and r["provider"] != "dense_loop":
                r["time_vs_dense_loop"] = r["median_us"] / lp
            continue
        d = base.get(("dense_cublas",) + shape(r))
        if d and r["provider"] != "dense_cublas":
            r["time_vs_dense"] = r["median_us"] / d
        c = base.get(("cuda",) + shape(r))
        if c and r["provider"] == "triton":
            r["time_vs_cuda"] = r["median_us"] / c


def summary_line(report: dict) -> str:
    """One line: what ran, what passed, the headline ratios."""
    parts = []
    stages = report.get("stages") or []
    if stages:
        ok = sum(1 for s in stages if s["status"] in ("ok", "dry"))
        bad = [f"{s['name']}={s['status']}" for s in stages if s["status"] not in ("ok", "dry")]
        parts.append(f"stages {ok}/{len(stages)} ok" + (f" ({', '.join(bad)})" if bad else ""))
    for name, t in (report.get("tests") or {}).items():
        c = t.get("counts", {})
        if t.get("collected") is not None and not c.get("passed") and not c.get("failed"):
            parts.append(f"{name}: {t['collected']} collected")
        else:
            parts.append(f"{name}: {c.get('passed', 0)} passed, {c.get('failed', 0)} failed"
                         + (f", {len(t['timeouts'])} timed out" if t.get("timeouts") else ""))
    rows = [r for r in report.get("results", []) if "median_us" in r]
    for prov in ("cuda", "triton", "cpu"):
        rs = sorted((r for r in rows if r["provider"] == prov and r["op"] == "fwd"
                     and "time_vs_dense" in r), key=lambda r: r["T"])
        if rs:
            parts.append(f"{prov} fwd/dense " + " ".join(f"T={r['T']}:{r['time_vs_dense']:.2f}x"
                                                         for r in rs))
    tc = [r["time_vs_cuda"] for r in rows if "time_vs_cuda" in r]
    if tc:
        parts.append(f"triton/cuda {min(tc):.2f}-{max(tc):.2f}x")
    nb = [r for r in rows if r["op"] == "batched_fwd" and r["provider"].endswith("_nosync")]
    if nb:
        parts.append(f"batched rows {len([r for r in rows if r['op'] == 'batched_fwd'])} "
                     f"({len(nb)} sync-free)")
        for prov in sorted({r["provider"] for r in nb}):
            rs = [r for r in nb if r["provider"] == prov and "time_vs_dense_loop" in r]
            if rs:
                parts.append(f"{prov}/dense_loop " + " ".join(
                    f"{r['case']}{r['adapters']}:{r['time_vs_dense_loop']:.2f}x" for r in rs))
    v = report.get("triton_variants")
    if v:
        parts.append(f"triton JIT variants: {v.get('compiled_total', 0)} compiled, "
                     f"{v.get('keys_total', 0)} launch keys")
    errs = [r for r in report.get("results", []) if "error" in r]
    if errs:
        parts.append(f"{len(errs)} rows with errors")
    if report.get("dry_run"):
        parts.insert(0, "DRY RUN")
    return "gpu-check: " + "; ".join(parts) if parts else "gpu-check: nothing ran"


# ---- benchmark ---------------------------------------------------------------------------------

def triton_unavailable(device: str, dry_run: bool) -> str | None:
    """Why the Triton ops cannot be benchmarked here (None: try them)."""
    try:
        import lori_kernels.triton as lori_triton
    except Exception as e:
        return f"lori_kernels.triton: {type(e).__name__}: {e}"
    if not lori_triton.available():
        return f"triton backend unavailable: {lori_triton.import_error!r}"
    if device == "cpu" and not lori_triton.interpreted():
        return "CPU tensors need TRITON_INTERPRET=1"
    return None


def run_bench(args, report, add, wanted, deadline) -> None:
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device (LORI_GPU_CHECK_DRY_RUN=1 rehearses on CPU)")
    import lori_kernels
    from lori_kernels import reference
    from lori_kernels.packing import pack_bitmask

    tokens = [int(t) for t in args.tokens.split(",")]
    feats, rank = args.features, args.rank
    dtype = torch.bfloat16
    if args.dry_run:  # CPU sizes; the interpreter (Triton) is slower still
        tokens = [t for t in tokens if t <= (1 if "triton" in wanted else 16)] or [1]
        feats, dtype = min(feats, 128 if "triton" in wanted else 256), torch.float32
    esize = torch.finfo(dtype).bits // 8
    timer, timer_name = make_timer(device)
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    peak = peak_gbps(name) if device == "cuda" else None
    log(f"device: {name}; datasheet peak {peak} GB/s; timer: {timer_name}")
    copy_gbps = measure_copy_gbps(device)
    if copy_gbps:
        log(f"measured device-to-device copy: {copy_gbps:.0f} GB/s")
    report["device"] = {
        "name": name, "peak_gbps_datasheet": peak, "copy_gbps_measured": copy_gbps,
        "torch": torch.__version__, "cuda": torch.version.cuda, "timer": timer_name,
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count
        if device == "cuda" else None,
    }
    try:
        import triton
        report["device"]["triton"] = triton.__version__
    except ImportError:
        report["device"]["triton"] = None

    ops = torch.ops.lori
    providers = {}
    if "cuda" in wanted:
        if device == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key(
                "lori::sparse_delta", "CUDA"):
            providers["cuda"] = (ops.sparse_delta, ops.sparse_delta_backward)
        elif device == "cpu":
            providers["cpu"] = (ops.sparse_delta, ops.sparse_delta_backward)
        else:
            report["errors"].append("lori_kernels._C has no CUDA kernels (built without CUDA?)")
    if "triton" in wanted:
        why = triton_unavailable(device, args.dry_run)
        if why is None:
            providers["triton"] = (ops.triton_sparse_delta, ops.triton_sparse_delta_backward)
        else:
            report["errors"].append(f"triton skipped: {why}")
    log(f"providers: {sorted(providers)}" + (" + dense_cublas" if "dense" in wanted else ""))

    seed = lori_kernels.spec.check_seed(lori_kernels.layer_seed(1234, "gpu_check"))
    dist, scale = "rademacher", 2.0
    gen = torch.Generator().manual_seed(0)
    b_full = torch.randn(feats, rank, generator=gen)
    mask = torch.rand(feats, rank, generator=gen) >= args.sparsity
    packed = pack_bitmask(b_full * mask, mask, dtype=dtype).to(device)
    b_dense = (b_full * mask).to(dtype).to(device)
    a = lori_kernels.random_a(seed, rank, feats, distribution=dist, dtype=dtype, device=device)
    t_begin = time.time()

    for T in tokens:
        x = torch.randn(T, feats, generator=gen).to(dtype).to(device)
        gy = torch.randn(T, feats, generator=gen).to(dtype).to(device)
        y_dense = reference.dense_lora(x, a, b_dense, scale)
        ref_max = y_dense.float().abs().max().item()
        for with_bwd in (False, True):
            op_name = "fwd+bwd" if with_bwd else "fwd"
            if time.time() - t_begin > args.budget_s or time.time() > deadline:
                report["errors"].append(f"budget: skipped T={T} {op_name} and later cases")
                break
            cases = []
            if "dense" in wanted:
                if with_bwd:
                    xg = x.clone().requires_grad_(True)
                    bg = b_dense.clone().requires_grad_(True)

                    def dense_fn(xg=xg, bg=bg):
                        reference.dense_lora(xg, a, bg, scale).backward(gy)
                        xg.grad = None
                        bg.grad = None
                else:
                    def dense_fn():
                        reference.dense_lora(x, a, b_dense, scale)
                cases.append(("dense_cublas", dense_fn, None,
                              dense_bytes(T, feats, feats, rank, esize, with_bwd)))
            args_ = (packed.mask, packed.values, packed.offsets, rank, seed, dist, scale)
            for prov, (fwd, bwd) in providers.items():
                def fwd_fn(fwd=fwd):
                    return fwd(x, *args_)
                if with_bwd:
                    def fn(fwd=fwd, bwd=bwd):
                        fwd(x, *args_)
                        bwd(gy, x, *args_, True, True)
                else:
                    fn = fwd_fn
                cases.append((prov, fn, None if with_bwd else fwd_fn,
                              lori_bytes(T, feats, feats, packed, esize, with_bwd)))
            for prov, fn, check_fn, nbytes in cases:
                row = {"op": op_name, "provider": prov, "T": T, "in_features": feats,
                       "out_features": feats, "rank": rank, "sparsity": args.sparsity,
                       "dtype": str(dtype).replace("torch.", ""), "distribution": dist,
                       "bytes": nbytes}
                try:
                    if check_fn is not None:
                        y = check_fn()
                        err = (y.float() - y_dense.float()).abs().max().item()
                        row["max_err_vs_dense_rel"] = err / max(ref_max, 1e-30)
                    med, p20, p80 = timer(fn)
                    row.update(median_us=med, p20_us=p20, p80_us=p80,
                               gbps=nbytes / (med * 1e-6) / 1e9)
                    if peak:
                        row["roofline_frac"] = row["gbps"] / peak
                    if copy_gbps:
                        row["copy_frac"] = row["gbps"] / copy_gbps
                    frac = (f" {100 * row['roofline_frac']:.0f}% of peak"
                            if "roofline_frac" in row else "")
                    log(f"T={T:5d} {op_name:7s} {prov:12s} {med:9.1f} us "
                        f"[{p20:.1f}, {p80:.1f}] {row['gbps']:8.1f} GB/s{frac}")
                except ContextLost:
                    raise
                except Exception as e:
                    try:
                        note_error(report, row, e, device)
                    finally:
                        add(row)
                    log(f"T={T:5d} {op_name:7s} {prov:12s} ERROR {row['error']}")
                    continue
                add(row)
    if args.batched_budget_s > 0 and time.time() < deadline:
        try:
            run_batched(args, report, device, dtype, feats, rank, add, wanted, deadline)
        except ContextLost:
            raise
        except Exception as e:  # keep the single-adapter rows whatever happens here
            report["errors"].append(f"batched rows: {type(e).__name__}: {e}"[:500])
            log(f"batched rows: ERROR {type(e).__name__}: {e}")


# ---- main ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_check.json"))
    p.add_argument("--dry-run", action="store_true",
                   help="run on the CPU at small sizes (no GPU needed): checks the code paths")
    p.add_argument("--providers", default="cuda,dense,triton",
                   help="comma-separated subset of cuda, dense, triton")
    p.add_argument("--merge", action="store_true",
                   help="add to the rows already in --out (a later process of the same check)")
    p.add_argument("--update", action="store_true",
                   help="only fold stages/tests/variants into --out (imports no torch)")
    p.add_argument("--summary", action="store_true",
                   help="compute, store and print the one-line summary of --out")
    p.add_argument("--tokens", default="1,16,256,4096")
    p.add_argument("--features", type=int, default=4096, help="in_features = out_features")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="stop starting new single-adapter cases after this many seconds")
    p.add_argument("--batched-budget-s", type=float, default=45.0,
                   help="time budget of the batched rows (0 skips them)")
    p.add_argument("--deadline", type=float, default=None,
                   help="epoch seconds after which no new case starts")
    p.add_argument("--stages", default=None, help="the shell's stage table (TSV)")
    p.add_argument("--tests-log", action="append", default=None, metavar="NAME=PATH",
                   help="a pytest log to summarise under tests[NAME] (repeatable)")
    p.add_argument("--variants", default=None, help="a LORI_TRITON_VARIANTS file")
    args = p.parse_args(argv)

    report = load_json(args.out) if (args.merge or args.update or args.summary) else None
    if not report or report.get("schema") != SCHEMA:
        report = skeleton()
    update_report(report, args)

    def save():
        _ratio_rows(report)
        report["summary"] = summary_line(report)
        write_json(args.out, report)

    if args.update or args.summary:
        save()
        if args.summary:
            print(report["summary"], flush=True)
        return 0

    wanted = {w.strip() for w in args.providers.split(",") if w.strip()}
    deadline = args.deadline or float("inf")
    rc = 0
    proc = "+".join(sorted(wanted))

    def add(row):
        row["process"] = proc
        report["results"].append(row)
        save()  # keep what we have if a later case dies

    try:
        run_bench(args, report, add, wanted, deadline)
    except ContextLost:
        rc = 1
    except BaseException as e:  # no CUDA torch, no _C, an early CUDA fault, Ctrl-C, ...
        report["errors"].append(f"benchmark ({proc}) aborted: {type(e).__name__}: {e}"[:800])
        report.setdefault("tracebacks", []).append(traceback.format_exc()[-4000:])
        log(f"ERROR {type(e).__name__}: {e}")
        rc = 1
    finally:
        report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        save()
        log(f"wrote {args.out} ({len(report['results'])} rows)")
    failed = [r for r in report["results"] if "error" in r and r.get("process") == proc]
    return 1 if rc or failed else 0


if __name__ == "__main__":
    sys.exit(main())

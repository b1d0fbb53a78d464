"""Benchmark half of the GPU check (benchmarks/gpu_check.sh runs the build and tests first).

sparse_delta forward and forward+backward vs dense LoRA on cuBLAS (two F.linear calls,
reference.dense_lora) at in = out = 4096, rank 32, 90% sparsity, T in {1, 16, 256, 4096}, bf16.
Medians (with p20/p80) from triton.testing.do_bench (L2 flushed between runs), or CUDA events
when Triton is missing. Reports achieved GB/s on each provider's compulsory traffic and the
fraction of the memory roofline (the datasheet bandwidth of the named GPU, and a measured
device-to-device copy). Writes one JSON file and prints progress as it goes.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --dry-run --out /tmp/x.json     # CPU: exercises the code paths

Providers: "cuda" (torch.ops.lori.sparse_delta / sparse_delta_backward on CUDA tensors),
"triton" (torch.ops.lori.triton_* when lori_kernels.triton is importable), "dense_cublas".
fwd+bwd of the lori providers is the forward op plus the backward op (grad_x and grad_values);
for dense it is autograd through dense_lora with x and B requiring grad (A frozen).

Batched rows (op "batched_fwd"): batched_sparse_delta over a 64-adapter pool, T=64 decode
tokens over 1, 8 and 64 distinct adapters (interleaved) and T=2048 prefill over 8 adapters
(runs of 256), same shape/rank/sparsity/dtype. Providers: "cuda_batched"
(torch.ops.lori.batched_sparse_delta), "triton_batched" (torch.ops.lori.triton_batched_sparse_delta;
skipped, with the reason in "errors", when it has no kernel), "dense_loop" (a Python loop of
dense LoRA per adapter; the per-adapter token indices are computed outside the timing) and
"stacked_bmm" (gather dense A[ids], B[ids] per token from stacked tensors, then bmm). They run
with fewer timing reps and their own time budget (--batched-budget-s).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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
        def time_cpu(fn, reps: int = 5):
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


# ---- batched multi-adapter rows ---------------------------------------------------------------

BATCHED_CASES = [("decode", 64, 1, "interleaved"), ("decode", 64, 8, "interleaved"),
                 ("decode", 64, 64, "interleaved"), ("prefill", 2048, 8, "runs")]
BATCHED_POOL = 64


def _triton_batched_unavailable(device: str) -> str | None:
    """Why the Triton batched op cannot be benchmarked here (None: try it)."""
    if device != "cuda":
        return "dry run"
    try:
        import lori_kernels.triton as lori_triton
    except Exception as e:
        return f"lori_kernels.triton: {type(e).__name__}: {e}"
    if not lori_triton.available():
        return f"triton backend unavailable: {lori_triton.import_error!r}"
    return None


def run_batched(args, report, device, dtype, feats, rank, add) -> None:
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

    prov_name = "cuda_batched" if device == "cuda" else "cpu_batched"
    providers = {prov_name: ops.batched_sparse_delta}
    why = _triton_batched_unavailable(device)
    if why is None:
        providers["triton_batched"] = ops.triton_batched_sparse_delta
    else:
        report["errors"].append(f"triton_batched skipped: {why}")

    t_begin = time.time()
    for name, T, k, layout in cases:
        if time.time() - t_begin > args.batched_budget_s:
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
        fns = [("dense_loop", dense_loop)]
        for prov, op in list(providers.items()):
            fns.append((prov, lambda op=op: op(x, ids, *pool_args)))
        fns.append(("stacked_bmm", stacked_bmm))
        loop_us = None
        for prov, fn in fns:
            row = {"op": "batched_fwd", "case": name, "provider": prov, "T": T, "adapters": k,
                   "pool": n_pool, "layout": layout, "in_features": feats, "out_features": feats,
                   "rank": rank, "sparsity": args.sparsity,
                   "dtype": str(dtype).replace("torch.", ""), "distribution": "rademacher"}
            try:
                with torch.no_grad():
                    y = fn()
                    row["max_err_vs_dense_rel"] = \
                        (y.float() - y_ref.float()).abs().max().item() / ref_max
                    med, p20, p80 = timer(fn)
                row.update(median_us=med, p20_us=p20, p80_us=p80)
                if prov == "dense_loop":
                    loop_us = med
                elif loop_us:
                    row["time_vs_dense_loop"] = med / loop_us
                extra = (f" x{row['time_vs_dense_loop']:.2f} of the dense loop"
                         if "time_vs_dense_loop" in row else "")
                log(f"batched {name:7s} T={T:5d} adapters={k:3d} {prov:14s} {med:9.1f} us "
                    f"[{p20:.1f}, {p80:.1f}] err {row['max_err_vs_dense_rel']:.1e}{extra}")
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                log(f"batched {name:7s} T={T:5d} adapters={k:3d} {prov:14s} ERROR {row['error']}")
                if prov == "triton_batched":  # not written yet, or failing: stop asking
                    providers.pop(prov, None)
                    report["errors"].append(f"triton_batched dropped: {row['error']}")
            add(row)


# ---- main ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_check.json"))
    p.add_argument("--dry-run", action="store_true",
                   help="run on the CPU at small sizes (no GPU needed): checks the code paths")
    p.add_argument("--tokens", default="1,16,256,4096")
    p.add_argument("--features", type=int, default=4096, help="in_features = out_features")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="stop starting new cases after this many seconds")
    p.add_argument("--batched-budget-s", type=float, default=45.0,
                   help="time budget of the batched rows (0 skips them)")
    p.add_argument("--build-seconds", type=float, default=None)
    p.add_argument("--build-failed", action="store_true")
    p.add_argument("--tests-rc", type=int, default=None)
    p.add_argument("--tests-log", default=None)
    args = p.parse_args(argv)

    report: dict = {"schema": "lori_kernels.gpu_check/1", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "git_sha": git_sha(), "host": platform.node(),
                    "build": {"seconds": args.build_seconds, "ok": not args.build_failed},
                    "tests": None, "device": None, "results": [], "errors": []}
    if args.tests_rc is not None:
        tail = []
        if args.tests_log and os.path.exists(args.tests_log):
            with open(args.tests_log, errors="replace") as f:
                tail = [ln for ln in f.read().splitlines()
                        if ln.startswith(("====", "FAILED", "ERROR")) or " passed" in ln
                        or " failed" in ln][-40:]
        report["tests"] = {"rc": args.tests_rc, "passed": args.tests_rc == 0, "summary": tail}
    if args.build_failed:
        write_json(args.out, report)
        log(f"build failed: wrote {args.out}")
        return 1

    import torch

    import lori_kernels
    from lori_kernels import reference
    from lori_kernels.packing import pack_bitmask

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: use --dry-run on a CPU machine")
        return 1
    tokens = [int(t) for t in args.tokens.split(",")]
    feats, rank = args.features, args.rank
    dtype = torch.bfloat16
    if args.dry_run:
        tokens, feats, dtype = [t for t in tokens if t <= 16] or [1], min(feats, 256), torch.float32
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

    # Providers of the lori delta.
    ops = torch.ops.lori
    providers = {}
    if device == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key("lori::sparse_delta",
                                                                             "CUDA"):
        providers["cuda"] = (ops.sparse_delta, ops.sparse_delta_backward)
    elif device == "cpu":
        providers["cpu"] = (ops.sparse_delta, ops.sparse_delta_backward)
    else:
        report["errors"].append("lori_kernels._C has no CUDA kernels (built without CUDA?)")
    try:
        import lori_kernels.triton as lori_triton
        if device == "cuda" and lori_triton.available():
            providers["triton"] = (ops.triton_sparse_delta, ops.triton_sparse_delta_backward)
        elif device == "cuda":
            report["errors"].append(f"triton backend unavailable: {lori_triton.import_error!r}")
    except Exception as e:  # the Triton backend is optional
        report["errors"].append(f"triton backend unavailable: {type(e).__name__}: {e}")
    log(f"providers: {sorted(providers)} + dense_cublas")

    seed = lori_kernels.spec.check_seed(lori_kernels.layer_seed(1234, "gpu_check"))
    dist, scale = "rademacher", 2.0
    gen = torch.Generator().manual_seed(0)
    b_full = torch.randn(feats, rank, generator=gen)
    mask = torch.rand(feats, rank, generator=gen) >= args.sparsity
    packed = pack_bitmask(b_full * mask, mask, dtype=dtype).to(device)
    b_dense = (b_full * mask).to(dtype).to(device)
    a = lori_kernels.random_a(seed, rank, feats, distribution=dist, dtype=dtype, device=device)
    t_begin = time.time()

    def add(row):
        report["results"].append(row)
        write_json(args.out, report)  # keep what we have if a later case dies

    for T in tokens:
        x = torch.randn(T, feats, generator=gen).to(dtype).to(device)
        gy = torch.randn(T, feats, generator=gen).to(dtype).to(device)
        y_dense = reference.dense_lora(x, a, b_dense, scale)
        ref_max = y_dense.float().abs().max().item()
        dense_us = {}
        for with_bwd in (False, True):
            op_name = "fwd+bwd" if with_bwd else "fwd"
            if time.time() - t_begin > args.budget_s:
                report["errors"].append(f"budget: skipped T={T} {op_name} and later cases")
                break
            # dense cuBLAS baseline
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
            cases = [("dense_cublas", dense_fn, None,
                      dense_bytes(T, feats, feats, rank, esize, with_bwd))]
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
                    if prov == "dense_cublas":
                        dense_us[op_name] = med
                    elif op_name in dense_us:
                        row["time_vs_dense"] = med / dense_us[op_name]
                    extra = f" x{row['time_vs_dense']:.2f} of dense" if "time_vs_dense" in row else ""
                    frac = f" {100 * row['roofline_frac']:.0f}% of peak" if "roofline_frac" in row else ""
                    log(f"T={T:5d} {op_name:7s} {prov:12s} {med:9.1f} us "
                        f"[{p20:.1f}, {p80:.1f}] {row['gbps']:8.1f} GB/s{frac}{extra}")
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                    log(f"T={T:5d} {op_name:7s} {prov:12s} ERROR {row['error']}")
                add(row)
    if args.batched_budget_s > 0:
        try:
            run_batched(args, report, device, dtype, feats, rank, add)
        except Exception as e:  # keep the single-adapter rows whatever happens here
            report["errors"].append(f"batched rows: {type(e).__name__}: {e}"[:500])
            log(f"batched rows: ERROR {type(e).__name__}: {e}")
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(args.out, report)
    log(f"wrote {args.out} ({len(report['results'])} rows)")
    failed = [r for r in report["results"]
              if "error" in r and r["provider"] not in ("triton", "triton_batched")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

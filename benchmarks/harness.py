"""Timing harness: interleaved rounds, medians with p20/p80, machine and version stamps.

Every case times all its providers (ours and the baselines) in the same process, round by
round, so load drift on a shared machine hits them alike and the ratios stay meaningful even
when the absolute times do not. `bench(benchmark, fns, ...)` drives those rounds through
pytest-benchmark's `pedantic` (its JSON then holds the round statistics) and stores each
provider's own statistics in the benchmark's extra_info, which benchmarks/report.py reads.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

# The CPU features that decide which kernels (ours, and oneDNN's under torch) can run.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")

# Results that are no timing (adapter sizes): filled by the size tests, written into the JSON's
# "lori" section by benchmarks/conftest.py.
EXTRAS: dict = {}


def cpu_flags() -> dict[str, bool]:
    """{flag: present} for ISA_FLAGS, from /proc/cpuinfo (all False where it is unreadable,
    e.g. not Linux; the report then says 'flags unknown')."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return {}
    return {k: k in flags for k in ISA_FLAGS}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def lori_isa() -> str:
    """The instruction-set level lori's CPU kernels dispatch to right now.

    The C++ op only has a setter that returns the level in force before the call; setting
    that same level back leaves the cap as it was."""
    import lori_kernels.ops as ops

    level = ops.set_cpu_isa("auto")
    ops.set_cpu_isa(level)
    return level


def set_isa(level: str) -> str:
    """Cap lori's CPU kernels at `level` ("auto" lifts the cap); returns the level now in force
    (lower than asked when the CPU lacks it)."""
    import lori_kernels.ops as ops

    ops.set_cpu_isa(level)
    return lori_isa()


def machine() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        sha, dirty = "", ""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "isa_flags": cpu_flags(),
            "threads": torch.get_num_threads(), "lori_cpu_isa": lori_isa(),
            "torch": torch.__version__, "python": platform.python_version(),
            "git": sha + ("-dirty" if dirty else ""), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _summary(samples: dict[str, list[float]]) -> dict[str, dict]:
    return {k: {"median_us": statistics.median(v), "p20_us": _pct(v, 0.2),
                "p80_us": _pct(v, 0.8), "reps": len(v)} for k, v in samples.items()}


def interleave(fns: dict[str, Callable[[], object]], min_time: float = 1.5, min_reps: int = 15,
               max_reps: int = 400, warmup: int = 3, max_time: float = 6.0,
               runner: Callable[[Callable[[], None], int], None] | None = None
               ) -> dict[str, dict]:
    """Time several callables in interleaved rounds (so drift hits all alike); each round
    starts at the next provider, so none always runs right after the same other one.

    Rounds: enough for min_time, at least min_reps, at most max_reps, and no more than fit in
    max_time (but at least min(min_reps, 5)).
    `runner(round_fn, reps)` runs the rounds (default: a plain loop; `bench` passes
    pytest-benchmark's pedantic). Returns {name: {median_us, p20_us, p80_us, reps}}."""
    if not fns:
        raise ValueError("interleave: no callables to time")
    for fn in fns.values():
        for i in range(warmup):
            t0 = time.perf_counter()
            fn()
            if time.perf_counter() - t0 > max_time / 10:
                break  # a call of seconds is warm after one run; more would only cost minutes
    # Size the rounds from one timed call of each.
    one = 0.0
    for fn in fns.values():
        t0 = time.perf_counter()
        fn()
        one += time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, min_time / max(one, 1e-9))))
    # Slow cases (dense bf16 at T=2048 on a CPU without bf16 GEMMs: ~1 s a call) would spend
    # min_reps rounds of seconds each; cap a case's timed rounds near max_time, 5 rounds at least.
    if reps * one > max_time:
        reps = max(min(min_reps, 5), int(max_time / max(one, 1e-9)))
    names = list(fns)
    samples: dict[str, list[float]] = {k: [] for k in names}
    state = {"round": 0}

    def round_fn():
        r = state["round"]
        state["round"] = r + 1
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e6)

    if runner is None:
        for _ in range(reps):
            round_fn()
    else:
        runner(round_fn, reps)
    if any(len(v) != reps for v in samples.values()):
        raise RuntimeError(f"interleave: expected {reps} samples per provider, got "
                           f"{ {k: len(v) for k, v in samples.items()} }")
    return _summary(samples)


def compare(fns: dict[str, Callable[[], object]], **kw) -> dict[str, dict]:
    """interleave() outside pytest (scripts, `python -m benchmarks.bench_batched`)."""
    return interleave(fns, **kw)


def bench(benchmark, fns: dict[str, Callable[[], object]], *, info: dict,
          baseline: str | None = None, **kw) -> dict[str, dict]:
    """Interleaved rounds of `fns` through pytest-benchmark; per-provider statistics, the case
    description `info` and the lori CPU path go into benchmark.extra_info.

    `baseline`: the provider ratios are taken against (report.py computes them)."""
    if baseline is not None and baseline not in fns:
        raise ValueError(f"bench: baseline {baseline!r} is not among the providers {list(fns)}")

    def runner(round_fn, reps):
        benchmark.pedantic(round_fn, rounds=reps, iterations=1, warmup_rounds=0)

    res = interleave(fns, runner=runner, **kw)
    benchmark.extra_info.update(info)
    benchmark.extra_info["lori_isa"] = lori_isa()
    benchmark.extra_info["baseline"] = baseline
    benchmark.extra_info["providers"] = res
    return res

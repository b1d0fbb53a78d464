"""Timing harness: interleaved rounds, medians with p20/p80, machine and version stamps."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False).stdout.strip()
    except OSError:
        sha = ""
    try:  # the instruction set lori's CPU kernels run with ("auto" returns the current level)
        import lori_kernels  # noqa: F401
        isa = torch.ops.lori._set_cpu_isa("auto")
    except Exception:  # noqa: BLE001 - a stamp, never a failure
        isa = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "lori_cpu_isa": isa,
            "torch": torch.__version__, "python": platform.python_version(), "git": sha,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def compare(fns: dict[str, Callable[[], object]], min_time: float = 1.5, min_reps: int = 15,
            max_reps: int = 400, warmup: int = 3) -> dict[str, dict]:
    """Time several callables in interleaved rounds (so drift hits all alike).

    Returns {name: {median_us, p20_us, p80_us, reps}}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    # Size the rounds from one timed call of each.
    one = 0.0
    for fn in fns.values():
        t0 = time.perf_counter()
        fn()
        one += time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, min_time / max(one, 1e-9))))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e6)
    return {k: {"median_us": statistics.median(v), "p20_us": _pct(v, 0.2),
                "p80_us": _pct(v, 0.8), "reps": len(v)} for k, v in samples.items()}

"""pytest options and hooks of the benchmark suite (`pytest benchmarks/ -o python_files='bench_*.py'`,
which is what `python -m benchmarks.run` runs).

--bench-quick   the smoke configuration: every case kind, few sizes, few rounds.
--bench-smoke   with --bench-quick: the model-level serving bench at an even smaller size, so
                tests/test_bench_smoke.py stays short (`benchmarks.run --smoke`).
--bench-isa     cap lori's CPU kernels at a level (auto | avx512 | avx2 | generic) for the run.
--bench-threads torch threads for the run (default: torch's; --bench-quick alone: 1, so a smoke
                run on a loaded machine is not stretched by thread stalls).
The JSON written by --benchmark-json gets a "lori" section: the machine line (CPU model, ISA
flags, torch, threads, lori's CPU path), the size tables (no timing) the report prints, and the
whole results of the two self-contained benches run as cases here (bench_serving.py: "serving",
bench_comm.py: "comm"; each a plain test storing its run() dict, rendered by its report()).
"""
from __future__ import annotations

import os

import pytest

from .harness import EXTRAS, machine, set_isa


def pytest_addoption(parser):
    g = parser.getgroup("lori benchmarks")
    g.addoption("--bench-quick", action="store_true", default=False,
                help="smoke configuration: every case kind, few sizes and rounds")
    g.addoption("--bench-smoke", action="store_true", default=False,
                help="with --bench-quick: the serving bench at its smoke size (the smoke test)")
    g.addoption("--bench-isa", default="auto",
                help="cap lori's CPU kernels at this ISA level for the whole run")
    g.addoption("--bench-threads", type=int, default=None,
                help="torch.set_num_threads for the run (default: torch's; quick: 1)")


def pytest_configure(config):
    EXTRAS["loadavg_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    threads = config.getoption("--bench-threads")
    if threads is None and config.getoption("--bench-quick"):
        threads = 1
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"--bench-threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    level = config.getoption("--bench-isa")
    if level != "auto":
        got = set_isa(level)
        if got != level:
            # Asking for a level the CPU lacks must not look like a measurement of it.
            raise pytest.UsageError(f"--bench-isa {level}: this CPU runs lori at {got} at most")


@pytest.fixture
def quick(request) -> bool:
    return request.config.getoption("--bench-quick")


@pytest.fixture
def smoke(request) -> bool:
    return request.config.getoption("--bench-smoke")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["lori"] = {"machine": machine(), "quick": config.getoption("--bench-quick"),
                           "smoke": config.getoption("--bench-smoke"),
                           "isa_cap": config.getoption("--bench-isa"), **EXTRAS}

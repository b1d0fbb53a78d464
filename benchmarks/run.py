"""The benchmark suite: `python -m benchmarks.run [--quick] [--isa LEVEL] [--out DIR]` (what
`make bench` runs; `make bench BENCH_QUICK=1` is the smoke run; `make bench BENCH_ARGS="--isa
avx2 --threads 1"` passes options).

Runs `pytest benchmarks/ --benchmark-json=...` in this process (pytest-benchmark; the cases
are benchmarks/bench_*.py, each timing ours and its baselines interleaved in the same run),
then writes from that JSON: DIR/latest.json, latest.csv, report.md, ratio_vs_T.png and
batched_vs_adapters.png (benchmarks/report.py). A full run into the default folder also
refreshes the table between the bench markers of README.md (--no-readme: leave it).
A failed case fails the run and leaves the previous results in place.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")

# glibc serves multi-MB allocations (every output here) with fresh mmaps unless its threshold
# has adapted, so runs flip between a page-faulting mode and a reusing one (2.5x apart on the
# dense baseline at T=256). Pinning the thresholds makes every provider reuse heap memory.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824"


def pytest_args(json_path: str, quick: bool, isa: str, threads: int | None,
                extra: list[str], smoke: bool = False) -> list[str]:
    args = [HERE, "-o", "python_files=bench_*.py", "-p", "no:cacheprovider",
            f"--benchmark-json={json_path}", "--benchmark-columns=median,rounds",
            "--benchmark-sort=fullname", "--bench-isa", isa, "-q", "-rs", "--durations=10"]
    if threads is not None:
        args += ["--bench-threads", str(threads)]
    return (args + (["--bench-quick"] if quick or smoke else [])
            + (["--bench-smoke"] if smoke else []) + extra)


def refresh_readme(md: str) -> bool:
    if not os.path.exists(README):
        return False
    text = open(README).read()
    new = re.sub(r"(<!-- bench:begin -->\n).*?(<!-- bench:end -->)",
                 lambda mm: mm.group(1) + md + mm.group(2), text, flags=re.S)
    if new != text:
        open(README, "w").write(new)
    return new != text


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "GLIBC_TUNABLES" not in os.environ:
        os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.run", *argv])
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: every case kind, small sizes, few rounds (~1 min)")
    ap.add_argument("--smoke", action="store_true",
                    help="--quick with the serving bench at an even smaller size (the smoke test)")
    ap.add_argument("--isa", default="auto",
                    help="cap lori's CPU kernels at this level (auto, avx512, avx2, generic)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own; --quick alone: 1)")
    ap.add_argument("--out", default=RESULTS, help=f"results folder (default {RESULTS})")
    ap.add_argument("--no-readme", action="store_true", help="do not refresh README.md")
    ap.add_argument("pytest_extra", nargs="*", help="more pytest arguments, after --")
    args = ap.parse_args(argv)

    import pytest

    from . import report

    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    # The JSON is written outside the results folder until the run has passed, so neither a
    # failed nor an interrupted run leaves anything there.
    with tempfile.TemporaryDirectory(prefix="lori-bench-") as tmp:
        json_tmp = os.path.join(tmp, "latest.json")
        rc = pytest.main(pytest_args(json_tmp, args.quick, args.isa, args.threads,
                                     args.pytest_extra, smoke=args.smoke))
        if rc != 0:
            print(f"benchmarks.run: pytest exit status {int(rc)}; results in {args.out} left "
                  "as they were", file=sys.stderr)
            return int(rc) or 1
        if not os.path.exists(json_tmp):
            # pytest-benchmark writes no JSON when no timed case ran (e.g. `-- -k serving`).
            print("benchmarks.run: the selection ran no timed case, so there is no report; run "
                  "a self-contained bench on its own (python -m benchmarks.bench_serving "
                  "--json F, python -m benchmarks.bench_comm)", file=sys.stderr)
            return 1
        data = report.load(json_tmp, partial=bool(args.pytest_extra))
        shutil.move(json_tmp, os.path.join(args.out, "latest.json"))
    md = report.write(data, args.out)
    print(md)
    print(f"benchmarks.run: {len(data['benchmarks'])} cases in {time.time() - t0:.0f} s; "
          f"results in {args.out}")
    if (not args.quick and not args.smoke and not args.no_readme and not args.pytest_extra
            and os.path.abspath(args.out) == RESULTS):
        if refresh_readme(report.render(data, link_prefix="benchmarks/results/")):
            print("benchmarks.run: README.md table refreshed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The GPU check (`make gpu-check`): on a machine with an NVIDIA GPU, build lori_kernels._C with
# the CUDA sources for the present GPU, run the CUDA (and Triton, if present) tests on the GPU,
# then benchmark sparse_delta against dense cuBLAS LoRA and write one JSON file.
#
#   bash benchmarks/gpu_check.sh [RESULT_JSON]      (default benchmarks/results/gpu_check.json)
#
# Environment: PYTHON (interpreter with a CUDA torch; default: .venv/bin/python if it has one,
# else python3), TORCH_CUDA_ARCH_LIST (default: the present GPU's capability), MAX_JOBS
# (default: nproc), LORI_GPU_CHECK_TEST_TIMEOUT (seconds per test file, default 150),
# LORI_GPU_CHECK_BATCHED_TIMEOUT (seconds for the batched CUDA tests, run on their own, default 120),
# LORI_GPU_CHECK_SKIP_BUILD=1 (reuse an existing in-place build), LORI_GPU_CHECK_DRY_RUN=1
# (rehearse every step on a machine without a GPU). When $OUT is set (the device
# tool's output folder) the JSON and the logs are copied there too.
# Designed to finish within 8 minutes on an H200, build included. Exit status: 0 when the
# build, the tests and the benchmark all passed; 1 otherwise (the JSON is written regardless,
# as far as the run got).
set -uo pipefail
cd "$(dirname "$0")/.."
t_start=$(date +%s)
result=${1:-benchmarks/results/gpu_check.json}
mkdir -p "$(dirname "$result")"
logdir=$(dirname "$result")
build_log="$logdir/gpu_check_build.log"
test_log="$logdir/gpu_check_tests.log"
status=0

say() { echo "[gpu-check $(( $(date +%s) - t_start ))s] $*"; }

copy_out() {
  if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
    for f in "$result" "$build_log" "$test_log"; do
      [ -f "$f" ] && cp -f "$f" "$OUT/" 2>/dev/null
    done
  fi
  return 0
}
trap copy_out EXIT

# ---- interpreter ------------------------------------------------------------------------------------
has_cuda_torch() { "$1" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; }
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ] && has_cuda_torch .venv/bin/python; then
  py=.venv/bin/python
else
  py=python3
fi
if ! has_cuda_torch "$py"; then
  say "FAIL: $py has no CUDA build of torch"
  exit 1
fi
dry=()
if [ "${LORI_GPU_CHECK_DRY_RUN:-0}" = "1" ]; then
  # Rehearsal without a GPU: same steps, tests skip themselves, CPU-sized benchmark.
  dry=(--dry-run)
  gpu="none (dry run)"
  cap=9.0
else
  if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    smi=$(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | head -1 || echo "not installed")
    say "FAIL: torch sees no CUDA device (nvidia-smi: $smi); LORI_GPU_CHECK_DRY_RUN=1 rehearses"
    exit 1
  fi
  gpu=$("$py" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")')
  cap=$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')
fi
say "python: $py ($("$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))"
say "gpu: $gpu"

# ---- build --------------------------------------------------------------------------------------------
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
build_s=0
if [ "${LORI_GPU_CHECK_SKIP_BUILD:-0}" = "1" ] && ls lori_kernels/_C*.so >/dev/null 2>&1; then
  say "build: skipped (LORI_GPU_CHECK_SKIP_BUILD=1)"
else
  say "build: LORI_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS (log: $build_log)"
  b0=$(date +%s)
  # Incremental: ninja recompiles what changed, and everything when the torch (its include
  # paths, hence the compile commands) differs from the one that built build/.
  if ! LORI_BUILD_CUDA=1 "$py" setup.py build_ext --inplace >"$build_log" 2>&1; then
    build_s=$(( $(date +%s) - b0 ))
    tail -40 "$build_log"
    say "FAIL: build failed after ${build_s}s"
    "$py" benchmarks/gpu_check.py --out "$result" --build-seconds "$build_s" --build-failed \
      "${dry[@]}" || true
    exit 1
  fi
  build_s=$(( $(date +%s) - b0 ))
  warnings=$(grep -ci "warning" "$build_log" || true)
  say "build: ok in ${build_s}s ($warnings lines mentioning 'warning')"
fi

# ---- tests on the GPU ---------------------------------------------------------------------------------
unset TRITON_INTERPRET
: >"$test_log"
tests_rc=0
# "file|-k expression|timeout": the batched CUDA tests (test_cuda.py -k batched) run as their
# own pytest so that a slow or hanging batched kernel cannot starve the others.
for spec in "tests/test_cuda.py|not batched|${LORI_GPU_CHECK_TEST_TIMEOUT:-150}" \
            "tests/test_cuda.py|batched|${LORI_GPU_CHECK_BATCHED_TIMEOUT:-120}" \
            "tests/test_triton.py||${LORI_GPU_CHECK_TEST_TIMEOUT:-150}"; do
  IFS='|' read -r t kexpr tmo <<<"$spec"
  [ -f "$t" ] || continue
  kargs=()
  what=$t
  if [ -n "$kexpr" ]; then
    kargs=(-k "$kexpr")
    what="$t -k '$kexpr'"
  fi
  say "tests: $what (timeout ${tmo}s; log: $test_log)"
  echo "==== $what" >>"$test_log"
  mark=$(wc -l <"$test_log")
  PYTHONUNBUFFERED=1 timeout "$tmo" \
    "$py" -m pytest -q -ra -p no:cacheprovider "$t" "${kargs[@]}" >>"$test_log" 2>&1
  rc=$?
  [ "$rc" -eq 5 ] && rc=0  # -k selected nothing (e.g. no batched tests): not a failure
  tail -n +"$((mark + 1))" "$test_log" | grep -E "^(FAILED|ERROR)|passed|failed" | tail -12
  if [ "$rc" -ne 0 ]; then
    [ "$tests_rc" -eq 0 ] && tests_rc=$rc
    status=1
    say "tests: $what FAILED (rc=$rc; 124 = timed out)"
  else
    say "tests: $what passed"
  fi
done

# ---- benchmark -------------------------------------------------------------------------------------------
say "benchmark -> $result"
if ! PYTHONUNBUFFERED=1 "$py" benchmarks/gpu_check.py --out "$result" --build-seconds "$build_s" \
    --tests-rc "$tests_rc" --tests-log "$test_log" "${dry[@]}"; then
  status=1
  say "benchmark: FAILED"
fi
say "done (status $status)"
exit "$status"

#!/usr/bin/env bash
# The GPU check (`make gpu-check`): on a machine with an NVIDIA GPU, build lori_kernels._C with
# the CUDA sources for the present GPU, run the CUDA and (a GPU-sized subset of) the Triton
# tests on the GPU, benchmark sparse_delta against dense cuBLAS LoRA, and write one JSON file.
#
#   bash benchmarks/gpu_check.sh [RESULT_JSON]   (default benchmarks/results/gpu_check.json;
#                                                 dry runs: build/gpu_check_dry/gpu_check.json)
#
# One global deadline (LORI_GPU_CHECK_DEADLINE seconds, default 480 = 8 minutes) bounds the
# whole run: each stage runs under `timeout` for min(its cap, what is left minus a reserve for
# the report), and a stage with too little time left is skipped and recorded as such. Stages:
#   probe         interpreter, torch, GPU (a CUDA init that hangs is cut off too)
#   build         setup.py build_ext with the CUDA sources (cap LORI_GPU_CHECK_BUILD_TIMEOUT, 300)
#   import        lori_kernels loads (its _C and ops register)
#   tests_cuda    the op tests' CUDA cases but batched (pytest --backends cuda, tests/test_op_*.py,
#                 tests/test_backend_cuda.py)                          (cap ..._TEST_TIMEOUT, 150)
#   tests_batched the batched op's CUDA cases (tests/test_op_batched.py, test_backend_cuda.py's
#                 test_batched_*)                                      (cap ..._BATCHED_TIMEOUT, 90)
#   bench_cuda    gpu_check.py --providers cuda,dense                    (cap ..._BENCH_TIMEOUT, 150)
#   tests_triton  the Triton tests' GPU-sized subset (pytest --gpu-subset, tests/gpu_subset.py)
#                 with LORI_TRITON_VARIANTS counting JIT variants     (cap ..._TRITON_TIMEOUT, 150)
#   bench_triton  gpu_check.py --providers triton --merge, its own process (cap ..._BENCH_TIMEOUT)
# The Triton stages come after the CUDA ones and in processes of their own: a Triton fault
# (which poisons its process's CUDA context) cannot cost the CUDA rows. Tests skip the slow
# ones and, when pytest-timeout is installed (it is on the GPU image), each test is cut off
# after LORI_GPU_CHECK_PER_TEST_TIMEOUT seconds (default 60) with its stack in the log, so a
# hang names its test. After every stage the JSON is brought up to date (stages, test counts,
# Triton JIT variants) and the JSON and logs are copied to $OUT when it is set (the device
# tool's output folder), so a run killed from outside still returns what it had. The last line
# is a one-line summary (what ran, what passed, the headline ratios).
#
# Environment: PYTHON (default: .venv/bin/python if it has a CUDA torch, else python3),
# TORCH_CUDA_ARCH_LIST (default: the GPU's capability), MAX_JOBS (default: nproc),
# LORI_GPU_CHECK_SKIP_BUILD=1 (reuse an in-place build), LORI_GPU_CHECK_DRY_RUN=1 (rehearse
# every stage on a machine without a GPU: the probe accepts any torch, the build stage only
# loads the existing build, tests are collected but not run, the benchmark runs on the CPU at
# small sizes, Triton under the interpreter). Exit status 0 when every stage passed.
set -uo pipefail
cd "$(dirname "$0")/.."
t_start=$(date +%s)
dry=${LORI_GPU_CHECK_DRY_RUN:-0}
if [ "$dry" = "1" ]; then
  result=${1:-build/gpu_check_dry/gpu_check.json}
else
  result=${1:-benchmarks/results/gpu_check.json}
fi
logdir=$(dirname "$result")
mkdir -p "$logdir"
deadline_s=${LORI_GPU_CHECK_DEADLINE:-480}
reserve=${LORI_GPU_CHECK_RESERVE:-20}     # kept back for the final report and copies
min_stage=${LORI_GPU_CHECK_MIN_STAGE:-10}  # a stage given less than this is skipped
per_test=${LORI_GPU_CHECK_PER_TEST_TIMEOUT:-60}
deadline_at=$(( t_start + deadline_s ))
stages="$logdir/gpu_check_stages.tsv"
variants="$logdir/gpu_check_variants.json"
build_log="$logdir/gpu_check_build.log"
: >"$stages"
rm -f "$variants" "$result" "$logdir"/gpu_check_*.log
status=0
py=""
test_logs=()

say() { echo "[gpu-check $(( $(date +%s) - t_start ))s] $*"; }
left() { echo $(( deadline_at - $(date +%s) )); }

copy_out() {
  if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
    for f in "$result" "$stages" "$variants" "$logdir"/gpu_check_*.log; do
      [ -f "$f" ] && cp -f "$f" "$OUT/" 2>/dev/null
    done
  fi
  return 0
}

# Bring the JSON up to date (stage table, test logs, variant counts; imports no torch), then
# copy everything to $OUT. If even that fails, write a minimal JSON by hand.
report() {
  local args=(--out "$result" --update --stages "$stages" --variants "$variants")
  for t in "${test_logs[@]}"; do args+=(--tests-log "$t"); done
  [ "$dry" = "1" ] && args+=(--dry-run)
  if [ -z "$py" ] || ! timeout 60 "$py" benchmarks/gpu_check.py "${args[@]}" >/dev/null 2>&1; then
    if ! timeout 60 python3 benchmarks/gpu_check.py "${args[@]}" >/dev/null 2>&1; then
      local tab
      tab=$(tr '\t\n"\\' '  \047/' <"$stages")
      printf '{"schema": "lori_kernels.gpu_check/2", "errors": ["report writer failed"], "stages_raw": "%s"}\n' \
        "$tab" >"$result"
    fi
  fi
  copy_out
}
# On any exit (the end, an early failure, a signal): the report, then the one-line summary.
finish() {
  local rc=$? summary=""
  trap - EXIT
  [ "$rc" -ne 0 ] && status=1
  report
  if [ -n "$py" ]; then
    summary=$(timeout 60 "$py" benchmarks/gpu_check.py --out "$result" --summary 2>/dev/null | tail -1)
  fi
  say "done in $(( $(date +%s) - t_start ))s of ${deadline_s}s (status $status); JSON: $result"
  echo "${summary:-gpu-check: (no summary: the report writer failed)} [status $status, $(( $(date +%s) - t_start ))s]"
  exit "$status"
}
trap finish EXIT

record() {  # record NAME STATUS SECONDS DETAIL
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(echo "${4:-}" | tr '\t\n' '  ' | cut -c1-400)" >>"$stages"
  [ "$2" = "ok" ] || [ "$2" = "dry" ] || [ "$2" = "skipped" ] || status=1
  report
}

# budget CAP: seconds a stage may run now (0: do not start it).
budget() {
  local cap=$1 l
  l=$(( $(left) - reserve ))
  [ "$l" -lt "$cap" ] && cap=$l
  [ "$cap" -lt "$min_stage" ] && cap=0
  echo "$cap"
}

# stage NAME CAP LOG CMD...: run CMD under the stage's budget, appending to LOG.
stage() {
  local name=$1 cap=$2 log=$3
  shift 3
  local tmo s0 rc st
  tmo=$(budget "$cap")
  if [ "$tmo" -eq 0 ]; then
    say "$name: skipped (deadline: $(left)s left)"
    record "$name" skipped 0 "deadline: $(left)s left"
    status=1
    return 1
  fi
  say "$name: up to ${tmo}s (log: $log)"
  s0=$(date +%s)
  PYTHONUNBUFFERED=1 timeout -k 5 "$tmo" "$@" >>"$log" 2>&1
  rc=$?
  local sec=$(( $(date +%s) - s0 ))
  if [ "$rc" -eq 0 ]; then
    st=ok
    [ "$dry" = "1" ] && st=dry
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    st=timeout
  else
    st=failed
  fi
  say "$name: $st in ${sec}s (rc $rc)"
  [ "$st" = ok ] || [ "$st" = dry ] || tail -15 "$log" | sed 's/^/    /'
  record "$name" "$st" "$sec" "rc=$rc; ${STAGE_DETAIL:-}"
  STAGE_DETAIL=""
  return "$rc"
}

# ---- probe ------------------------------------------------------------------------------------
has_cuda_torch() { timeout 120 "$1" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; }
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ] && has_cuda_torch .venv/bin/python; then
  py=.venv/bin/python
else
  py=python3
fi
probe_log="$logdir/gpu_check_probe.log"
if [ "$dry" != "1" ] && ! has_cuda_torch "$py"; then
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' >"$probe_log" 2>&1
  say "FAIL: $py has no CUDA build of torch ($(tail -1 "$probe_log"))"
  record probe failed 0 "$py has no CUDA build of torch: $(tail -1 "$probe_log")"
  skip_rest build "no CUDA torch"
  exit 1
fi
if [ "$dry" = "1" ]; then
  probe_cmd='import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "(dry run: no GPU used)")'
else
  probe_cmd='import torch, sys
if not torch.cuda.is_available(): sys.exit("torch sees no CUDA device")
p = torch.cuda.get_device_properties(0)
print("torch", torch.__version__, "cuda", torch.version.cuda, "|", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
print("CAP %d.%d" % (p.major, p.minor))'
fi
ALL_STAGES="build import tests_cuda tests_batched bench_cuda tests_triton bench_triton"
skip_rest() {  # skip_rest FIRST_STAGE REASON: record FIRST_STAGE and every later one as skipped
  local on=0 st
  for st in $ALL_STAGES; do
    [ "$st" = "$1" ] && on=1
    [ "$on" = 1 ] && record "$st" skipped 0 "$2"
  done
  status=1
}
if ! stage probe 90 "$probe_log" "$py" -c "$probe_cmd"; then
  command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi -L >>"$probe_log" 2>&1
  say "FAIL: probe ($(tail -2 "$probe_log" | tr '\n' ' '))"
  skip_rest build "the probe failed"
  exit 1
fi
say "python: $py; $(head -1 "$probe_log")"
cap=$(sed -n 's/^CAP //p' "$probe_log")
cap=${cap:-9.0}
has_timeout_plugin=0
"$py" -c 'import pytest_timeout' 2>/dev/null && has_timeout_plugin=1

# ---- build ------------------------------------------------------------------------------------
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
: >"$build_log"
built=0
if [ "$dry" = "1" ] || { [ "${LORI_GPU_CHECK_SKIP_BUILD:-0}" = "1" ] && ls lori_kernels/_C*.so >/dev/null 2>&1; }; then
  # Rehearsal / reuse: nothing is compiled; the import stage proves the existing build loads.
  if ls lori_kernels/_C*.so >/dev/null 2>&1; then
    ls -l lori_kernels/_C*.so >"$build_log"
    st=ok
    [ "$dry" = "1" ] && st=dry
    record build "$st" 0 "existing build reused: $(ls lori_kernels/_C*.so | head -1)"
    built=1
  else
    record build failed 0 "no lori_kernels/_C*.so to reuse (run make build)"
  fi
else
  # Incremental: ninja recompiles what changed, and everything when the torch (its include
  # paths, hence the compile commands) differs from the one that built build/.
  # Without ninja on PATH torch falls back to a serial distutils build (much slower): say so.
  ninja_at=$(command -v ninja || echo "none (serial build)")
  STAGE_DETAIL="LORI_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS ninja=$ninja_at" \
    stage build "${LORI_GPU_CHECK_BUILD_TIMEOUT:-300}" "$build_log" \
    env LORI_BUILD_CUDA=1 "$py" setup.py build_ext --inplace && built=1
  say "build: $(grep -ci "warning" "$build_log" || true) lines mentioning 'warning'"
fi
import_log="$logdir/gpu_check_import.log"
if [ "$built" != 1 ]; then
  skip_rest import "no lori_kernels._C build"
  exit 1
fi
if ! stage import 60 "$import_log" "$py" -c 'import torch, lori_kernels; print("lori_kernels", lori_kernels.__version__, "loaded")'; then
  skip_rest tests_cuda "lori_kernels did not load (or its stage did not fit the deadline)"
  exit 1
fi

# ---- tests ------------------------------------------------------------------------------------
unset TRITON_INTERPRET
pytest_args=(-q -ra -p no:cacheprovider -m "not slow")
if [ "$dry" = "1" ]; then
  pytest_args+=(--collect-only)   # selections, plugins and flags are checked; nothing runs
elif [ "$has_timeout_plugin" = 1 ]; then
  # thread: a test stuck in a CUDA call is cut off too (its stack is printed, pytest exits).
  pytest_args+=(--timeout="$per_test" --timeout-method=thread)
else
  say "pytest-timeout not installed: no per-test timeouts (stage timeouts only)"
fi

runner=("$py")
run_tests() {  # run_tests NAME CAP PYTEST_ARGS...   (runs "${runner[@]}" -m pytest ...)
  local name=$1 cap=$2
  shift 2
  local log="$logdir/gpu_check_$name.log"
  test_logs+=("$name=$log")
  : >"$log"
  stage "$name" "$cap" "$log" "${runner[@]}" -m pytest "${pytest_args[@]}" "$@"
  local rc=$?
  grep -E "^(FAILED|ERROR)|Timeout|passed|failed|collected" "$log" | tail -8 | sed 's/^/    /'
  return $rc
}

# The op tests run on every backend: --backends cuda keeps their CUDA cases (tests/conftest.py).
cuda_tests=(tests/test_op_sparse_delta.py tests/test_op_merge_delta.py tests/test_op_random_a.py
            tests/test_op_batched.py tests/test_backend_cuda.py)
run_tests tests_cuda "${LORI_GPU_CHECK_TEST_TIMEOUT:-150}" --backends cuda "${cuda_tests[@]}" \
  -k "not test_op_batched and not test_batched"
run_tests tests_batched "${LORI_GPU_CHECK_BATCHED_TIMEOUT:-90}" --backends cuda "${cuda_tests[@]}" \
  -k "test_op_batched or test_batched"

# ---- benchmark: CUDA and dense rows -------------------------------------------------------------
bench_args=(benchmarks/gpu_check.py --out "$result" --stages "$stages" --variants "$variants")
[ "$dry" = "1" ] && bench_args+=(--dry-run)
bench_cap=${LORI_GPU_CHECK_BENCH_TIMEOUT:-150}
b=$(budget "$bench_cap")
stage bench_cuda "$bench_cap" "$logdir/gpu_check_bench_cuda.log" "$py" "${bench_args[@]}" \
  --providers cuda,dense --merge --deadline $(( $(date +%s) + b - 10 )) --budget-s $(( b * 2 / 3 )) \
  --batched-budget-s $(( b / 3 ))

# ---- Triton: tests, then benchmark rows (own processes) ----------------------------------------
# The Triton tests run a GPU-sized subset (--gpu-subset, tests/gpu_subset.py): few JIT variants,
# each a 0.4-2 s sm_90 compile on a cold cache.
triton_env=(env LORI_TRITON_VARIANTS="$PWD/$variants")
[ "$dry" = "1" ] && triton_env+=(TRITON_INTERPRET=1)
tt=(tests/test_op_sparse_delta.py tests/test_op_merge_delta.py tests/test_op_random_a.py
    tests/test_op_batched.py tests/test_backend_triton.py tests/test_triton_corrupt.py
    tests/test_triton_compile.py)
runner=("${triton_env[@]}" "$py")
STAGE_DETAIL="GPU subset" run_tests tests_triton "${LORI_GPU_CHECK_TRITON_TIMEOUT:-150}" \
  --gpu-subset "${tt[@]}"
b=$(budget "$bench_cap")
# No per-launch variant hook while timing (LORI_TRITON_VARIANTS_KEYS=0): compiled count only.
stage bench_triton "$bench_cap" "$logdir/gpu_check_bench_triton.log" "${triton_env[@]}" \
  LORI_TRITON_VARIANTS_KEYS=0 "$py" \
  "${bench_args[@]}" --providers triton --merge --deadline $(( $(date +%s) + b - 10 )) \
  --budget-s $(( b * 2 / 3 )) --batched-budget-s $(( b / 3 ))

exit "$status"   # finish (the EXIT trap) writes the report and prints the summary

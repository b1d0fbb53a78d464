#!/usr/bin/env bash
# `make gpu-precheck`: compile every lori Triton kernel for sm_90, offline, under the Triton the
# GPU machine runs (triton==3.6.0; the pinned Triton's compile is tests/test_triton_compile.py
# in `make test`). Triton is installed with `pip install --no-deps --target` into a temporary
# folder put first on PYTHONPATH, so the venv is untouched.
#
# Fails when a kernel does not compile, or when the install fails for any reason but an
# unreachable package index (then it says so and exits 0: a machine offline cannot run the
# check, which is not a defect of the kernels; LORI_GPU_PRECHECK_STRICT=1 fails then too).
# Environment: GPU_TRITON (default triton==3.6.0), PY (default .venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
py=${PY:-.venv/bin/python}
spec=${GPU_TRITON:-triton==3.6.0}
if ! "$py" -c 'import torch' 2>/dev/null; then
  echo "gpu-precheck: FAILED: $py has no torch (run \`make test\` or \`make venv\` first)" >&2
  exit 1
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/lori-gpu-precheck.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

if ! timeout 600 "$py" -m pip install -q --no-deps --disable-pip-version-check \
    --target "$tmp/site" "$spec" >"$tmp/pip.log" 2>&1; then
  tail -20 "$tmp/pip.log" >&2
  if grep -qiE "NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|Name or service not known|Network is unreachable|ConnectTimeout|Read timed out|ProxyError|Max retries exceeded|No route to host" "$tmp/pip.log" \
      && [ "${LORI_GPU_PRECHECK_STRICT:-0}" != "1" ]; then
    echo "gpu-precheck: SKIPPED: $spec could not be downloaded (package index unreachable);" \
         "the kernels were NOT compiled under it" >&2
    exit 0
  fi
  echo "gpu-precheck: FAILED: could not install $spec into a temporary folder (see pip's" \
       "output above); the Triton 3.6 compile of the kernels cannot run" >&2
  exit 1
fi
got=$(PYTHONPATH="$tmp/site" "$py" -c 'import triton; print(triton.__version__, triton.__file__)')
case "$got" in
  *"$tmp/site"*) ;;
  *) echo "gpu-precheck: FAILED: the installed $spec is not the one imported ($got)" >&2; exit 1 ;;
esac
# A cache of its own: a kernel compiled by another Triton (or an earlier run) proves nothing.
PYTHONPATH="$tmp/site" TRITON_CACHE_DIR="$tmp/cache" timeout 900 "$py" tests/triton_compile_check.py
rc=$?
echo "gpu-precheck: triton $got -> rc $rc in $(( $(date +%s) - t0 ))s"
exit "$rc"

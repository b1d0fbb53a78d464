#!/usr/bin/env bash
# `make sanitize`: a CPU-only ASAN + UBSAN build of lori_kernels._C in build/sanitize (the
# normal lori_kernels/_C*.so is left alone) and the CPU tests under it (not Triton, not CUDA,
# not slow). The package is copied next to the sanitized .so and the tests run from there, so
# `import lori_kernels` finds that copy first (the working directory precedes site-packages).
# Masked vector loads are invisible to ASAN: tests/test_guard_pages.py covers them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SAN=$ROOT/build/sanitize
PY=$ROOT/.venv/bin/python
start=$(date +%s)
LORI_SANITIZE=1 LORI_BUILD_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" setup.py -q build_ext --build-lib "$SAN/lib" --build-temp "$SAN/tmp"
built=$(date +%s)
rm -rf "$SAN/pkg"
mkdir -p "$SAN/pkg"
cp -r lori_kernels "$SAN/pkg/"
find "$SAN/pkg" -name '__pycache__' -prune -exec rm -rf {} +
rm -f "$SAN"/pkg/lori_kernels/_C*.so
cp "$SAN"/lib/lori_kernels/_C*.so "$SAN/pkg/lori_kernels/"

# The Python interpreter is not instrumented: the ASAN runtime must be loaded first, and
# libstdc++ right after it, so ASAN's __cxa_throw interceptor finds the real one (without it,
# the first C++ exception of a non-instrumented extension, e.g. libtriton's, aborts).
LD_PRELOAD="$(${CXX:-c++} -print-file-name=libasan.so) $(${CXX:-c++} -print-file-name=libstdc++.so)"
export LD_PRELOAD
# Leak checking would report the interpreter's own allocations; any other report fails.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:halt_on_error=1:detect_odr_violation=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
cd "$SAN/pkg"
so=$("$PY" -c "import lori_kernels, lori_kernels.ops; import sys; print(sys.modules['lori_kernels._C'].__file__)")
case "$so" in
  "$SAN"/pkg/*) echo "sanitize: testing $so" ;;
  *) echo "sanitize: imported $so, not the sanitized build" >&2; exit 1 ;;
esac
set +e
"$PY" -m pytest -q -ra -p no:cacheprovider -m "not slow" -k "not triton" \
  --rootdir "$ROOT" -c "$ROOT/pyproject.toml" \
  --ignore "$ROOT/tests/test_backend_triton.py" --ignore "$ROOT/tests/test_backend_cuda.py" \
  --backends cpu "$@" "$ROOT/tests"
rc=$?
echo "sanitize: build $((built - start))s, tests $(( $(date +%s) - built ))s, rc=$rc"
[ "$rc" -eq 5 ] && { echo "sanitize: no tests collected" >&2; exit 1; }
exit "$rc"

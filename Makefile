# triton_lstm — every target sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# The CPU build of torch where no torch is installed (a plain `pip install torch`
# would pull a multi-GB CUDA build onto a machine without a GPU).
TORCH_SPEC ?= torch==2.13.0
OUT ?= perf/results
# The Triton the lent GPU machines run: the sm_90 code checks run under it too.
DEVICE_TRITON ?= 3.6.0
DEVICE_TRITON_DIR = .triton-$(DEVICE_TRITON)
# And their torch. How torch.compile, export, vmap and autograd treat the layer changes from one
# torch to the next, so the tests of that run under it too, in a virtual environment of its own
# (PyPI's build of it, which runs on a CPU too; a few GB).
DEVICE_TORCH ?= 2.11.0
DEVICE_VENV = .venv-torch-$(DEVICE_TORCH)
DEVICE_TORCH_TESTS = test_compat or compile or vmap or export or jit or autocast or func or gradcheck

.PHONY: install test codegen-check device-torch-check perf perf-quick tune gpu-check demo lint

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[test,perf]"

# On every core (pytest-xdist): the interpreted kernels and the sm_90 compiles are CPU-bound.
test: install
	$(PYTHON) -m pytest -q -n auto tests

# The sm_90 code checks (tests/test_codegen.py) again, compiled by the GPU machines' Triton
# (installed into a folder of its own that shadows the usual one on PYTHONPATH).
codegen-check: install
	test -d $(DEVICE_TRITON_DIR)/triton || $(PIP) install -q --no-deps --target $(DEVICE_TRITON_DIR) "triton==$(DEVICE_TRITON)"
	PYTHONPATH=$(CURDIR)/$(DEVICE_TRITON_DIR) $(PYTHON) -m pytest -q -n auto -p no:cacheprovider tests/test_codegen.py

# The integration tests (torch.compile, export, vmap, autocast, gradcheck) under the GPU
# machines' torch and Triton. Its environment is set up again unless every package imports
# (an install cut short leaves the environment behind).
device-torch-check:
	$(DEVICE_VENV)/bin/python -c "import torch, triton, numpy, pytest, xdist" 2>/dev/null || ($(PYTHON) -m venv $(DEVICE_VENV) && $(DEVICE_VENV)/bin/pip install -q "torch==$(DEVICE_TORCH)" "triton==$(DEVICE_TRITON)" "numpy<2.4" pytest pytest-xdist)
	PYTHONPATH=$(CURDIR) $(DEVICE_VENV)/bin/python -m pytest -q -n auto -p no:cacheprovider tests -k "$(DEVICE_TORCH_TESTS)"

perf: install
	$(PYTHON) perf/bench.py

perf-quick: install
	$(PYTHON) perf/bench.py --quick

# One resumable sweep per GPU, at most 8 minutes (TUNE_ARGS: e.g. --fresh, --wide, --plan).
tune: install
	$(PYTHON) perf/tune.py $(TUNE_ARGS)

# On a GPU machine with torch and triton already there (no install step, no network):
# the GPU tests, then a short timing table; logs under $OUT when set.
gpu-check:
	mkdir -p "$(OUT)"
	set -o pipefail; PYTHONPATH=$(CURDIR) $(PYTHON) -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$(OUT)/gpu-tests.log"
	set -o pipefail; PYTHONPATH=$(CURDIR) $(PYTHON) perf/gpu_check.py 2>&1 | tee "$(OUT)/gpu-timing.log"

demo: install
	$(PYTHON) examples/char_lm.py

lint:
	$(PYTHON) -m pyflakes triton_lstm tests perf 2>/dev/null || $(PYTHON) -m compileall -q triton_lstm tests perf

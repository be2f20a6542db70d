# dist_sparse: `make demo` and `make test` work on a fresh machine (they run `make setup` when needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.dist_sparse_installed
TORCH_VERSION ?= 2.13.0
DEEPSPEED_VERSION ?= 0.19.8
# CPU unless a GPU is there: DeepSpeed picks its accelerator from this
export DS_ACCELERATOR ?= $(shell $(PYTHON) -c "import shutil; print('cuda' if shutil.which('nvidia-smi') else 'cpu')" 2>/dev/null || echo cpu)

.PHONY: setup demo test test-fast lint bench gpu-check clean

setup: $(STAMP)

# torch first (here a local CPU build), then deepspeed without build isolation (so pip does not pull a second,
# CUDA torch into a build environment), then the rest; the package itself last, without touching the others.
$(STAMP): pyproject.toml requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: setup
	$(VENV)/bin/dist-sparse train configs/demo.yaml --nproc 2 --set train.overwrite_output_dir=true

# two pytest workers, one test file each at a time (--dist loadfile keeps a file's module-scoped multi-rank reports
# on one worker): the multi-rank tests spend much of their time starting processes and waiting on each other, so
# two files overlap well on 2 cores
PYTEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -ra -n $(PYTEST_WORKERS) --dist loadfile

test-fast: setup
	$(PY) -m pytest -q -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile

lint: setup
	$(VENV)/bin/ruff check .

# Rewrites docs/benchmarks.md from the sections each bench script writes to bench/results/.
bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done
	$(PY) bench/report.py

# On a CUDA machine: every gpu-marked test and the GPU benchmark sections within 8 minutes, figures and logs into
# GPU_CHECK_OUT (default runs/gpu-check). Uses the torch/Triton already installed (no setup, no package registry):
# the project's venv when there is one, else $(PYTHON). Without CUDA it says so and exits 0.
GPU_CHECK_OUT ?= runs/gpu-check
gpu-check:
	GPU_CHECK_OUT=$(GPU_CHECK_OUT) $(if $(wildcard $(PY)),$(PY),$(PYTHON)) bench/gpu_check.py

clean:
	rm -rf runs .pytest_cache

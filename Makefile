# Every target bootstraps its own virtual environment: on a fresh machine `make demo` and
# `make test` are the only two commands needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ptxseg-installed
export HF_HUB_OFFLINE ?= 1
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: install demo test lint bench clean

install: $(STAMP)

# TORCH_INDEX: a PyTorch wheel index to take torch/torchvision from first, e.g. the CPU-only
# builds (https://download.pytorch.org/whl/cpu: ~1 GB instead of ~5 GB of CUDA libraries).
TORCH_INDEX ?=

# pip shows its own progress (each package collected, a bar per download on a terminal): the
# first install takes minutes and should not look like a hang.
PIP := $(BIN)/python -m pip install --disable-pip-version-check --progress-bar on
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || echo "make: creating the virtual environment $(VENV)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "make: installing ptxseg and its dependencies into $(VENV) (PyTorch included:" \
	  "3-5 minutes and up to a few GB of downloads on a fresh machine; pip's progress follows)"
	$(if $(TORCH_INDEX),$(PIP) torch torchvision --index-url $(TORCH_INDEX))
	$(PIP) -e ".[dev]"
	touch $(STAMP)
	@echo "make: installed; $(VENV)/bin/ptxseg is ready"

demo: $(STAMP)
	$(BIN)/ptxseg demo --out demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

# Throughput and memory benchmarks at their default (GPU-sized) settings; docs/benchmarks.md
# gives the smaller settings used on a CPU. SAMPLE: real 1024x1024 SIIM PNG pairs.
SAMPLE ?= ../shared/data/siim-sample
bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py --data $(SAMPLE)
	$(BIN)/python benchmarks/predict_throughput.py --sample $(SAMPLE)/png_images
	$(BIN)/python benchmarks/tune_speed.py
	$(BIN)/python benchmarks/predict_memory.py
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf $(VENV) demo .pytest_cache

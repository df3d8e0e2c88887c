# medmetric: `make demo` and `make test` are all a fresh machine needs (both run `setup` first).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medmetric-installed

DATA ?= ham10000
DATA_DIR ?= ../shared/data/$(DATA)
EXPERIMENT ?= $(DATA)
ARGS ?=
PYTEST_ARGS ?=
SEEDS ?= 3
SMALL ?=
RUNS ?= runs/*/stage*/*
OUT ?= runs/report

export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.DEFAULT_GOAL := help
.PHONY: help setup test demo check-data train-stage1 train-stage2 reproduce report lint bench bench-losses bench-stage2 bench-data bench-training sweep clean-venv

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-14s %s\n", $$1, $$2}'
	@echo "  variables: DATA=$(DATA) DATA_DIR=$(DATA_DIR) EXPERIMENT=$(EXPERIMENT) ARGS='--model.lr=0.01 ...'"

setup: $(STAMP) ## create .venv and install medmetric editable with dev extras (idempotent)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: setup ## run the test suite (CPU, tiny data; real-data tests use ../shared/data when present)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup ## CE vs CE->cRT vs CE+SupCon->cRT on HAM10000 (synthetic fallback), one table
	$(PY) -m medmetric.experiments.demo $(ARGS)

check-data: setup ## every data check, no training: make check-data DATA=ham10000 DATA_DIR=...
	$(PY) -m medmetric.experiments check-data --data $(DATA) --data_dir $(DATA_DIR) $(ARGS)

train-stage1: setup ## stage 1: make train-stage1 DATA=ham10000 DATA_DIR=... ARGS="--model.lr=0.01"
	$(PY) -m medmetric.experiments fit --config experiments/$(DATA)/stage1.yaml --data.data_dir=$(DATA_DIR) --experiment=$(EXPERIMENT) $(ARGS)

train-stage2: setup ## stage 2 (cRT) on the stage-1 handoff of EXPERIMENT: make train-stage2 DATA=ham10000
	$(PY) -m medmetric.experiments fit --config experiments/$(DATA)/stage2.yaml --data.data_dir=$(DATA_DIR) --experiment=$(EXPERIMENT) $(ARGS)

reproduce: setup ## paper-style comparison over SEEDS seeds + report; SMALL=1 for 2 CPU cores
	$(PY) -m medmetric.experiments.reproduce --seeds $(SEEDS) $(if $(SMALL),--small,) $(if $(filter-out ../shared/data/$(DATA),$(DATA_DIR)),--data_dir $(DATA_DIR),) $(ARGS)

report: setup ## markdown/CSV/figures across runs: make report RUNS='runs/exp*/stage2/*' OUT=runs/report
	$(PY) -m medmetric.experiments.report $(RUNS) --out $(OUT) $(ARGS)

bench: bench-losses bench-stage2 bench-retrieval bench-data bench-training ## every benchmark (ratios against a reference measured in the same run)

bench-losses: setup ## metric losses: our wrappers vs pytorch-metric-learning direct, B=256/1024
	$(PY) -m bench.metric_losses $(ARGS)

bench-stage2: setup ## cRT epoch on cached vs uncached features; retrieval vs pytorch-metric-learning
	$(PY) -m bench.stage2 $(ARGS)
	$(PY) -m bench.retrieval $(ARGS)

.PHONY: bench-retrieval demo-kimia
bench-retrieval: setup ## search index: faiss IndexFlatIP vs exact chunked torch, 100k x 128, queries/s at k=10
	$(PY) -m bench.retrieval --mode index $(ARGS)

demo-kimia: setup ## Kimia Path24 (synthetic fallback): stage 1, retrieval metrics, medmetric index + search
	$(PY) -m medmetric.experiments.kimia_demo $(ARGS)

bench-data: setup ## image loading: preprocessed image cache vs decoding each JPEG, at 64 and 224 px
	$(PY) -m bench.data_loading $(ARGS)

bench-training: setup ## stage-1 images/s: medmetric (DataModule, sampler, Trainer) vs a bare PyTorch loop
	$(PY) -m bench.training_throughput $(ARGS)

STAGE ?= 1
COUNT ?=
WANDB_PROJECT ?= medmetric
sweep: setup ## W&B sweep + agent: make sweep DATA=ham10000 STAGE=1 [COUNT=20] (needs `wandb login`)
	@set -o pipefail; out=$$($(VENV)/bin/wandb sweep --project $(WANDB_PROJECT) experiments/sweeps/stage$(STAGE)_$(DATA).yaml 2>&1 | tee /dev/stderr); \
	id=$$(printf '%s\n' "$$out" | sed -n 's/.*wandb agent \([^ ]*\).*/\1/p' | tail -1); \
	test -n "$$id" || { echo "no sweep id in the output of wandb sweep (logged in? try: $(VENV)/bin/wandb login)"; exit 1; }; \
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/wandb agent $(if $(COUNT),--count $(COUNT),) $$id

lint: setup ## ruff check
	$(VENV)/bin/ruff check .

clean-venv: ## remove .venv (runs/ with your results is never touched)
	rm -rf $(VENV)

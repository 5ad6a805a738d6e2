# fuse-lightning — `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where CIFAR-10 lives (the folder that contains cifar-10-batches-py/). Override: make demo DATA_DIR=...
DATA_DIR ?= $(if $(wildcard ../shared/data/cifar-10-batches-py),../shared/data,data)
SWEEP ?= configs/sweeps/cifar10_cpu.yaml
BACKEND ?= local

.DEFAULT_GOAL := help
.PHONY: help install test test-all lint fit victim demo sweep bench gpu-check clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

install: ## Create .venv and install the package (editable) with its dev extra
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel
	$(BIN)/pip install -q -e '.[dev]'

test: ## Run the test suite on CPU (GPU-only tests skip themselves)
	$(BIN)/python -m pytest -q

lint: ## Lint with ruff
	$(BIN)/ruff check fuse_lightning tests

victim: ## Train a clean victim on CIFAR-10 (configs/victim_cifar10.yaml)
	$(BIN)/lightning fit --config configs/victim_cifar10.yaml --data.init_args.data_dir $(DATA_DIR)

fit: ## The main job: train FUSE on CIFAR-10 (configs/fuse_cifar10.yaml; GPU-scale)
	$(BIN)/lightning fit --config configs/fuse_cifar10.yaml --data.init_args.data_dir $(DATA_DIR)

demo: ## CPU-sized end-to-end run: FUSE, protect, victims on clean/EM/FUSE data, print the table
	$(BIN)/python -m fuse_lightning.demo --data_dir $(DATA_DIR)

sweep: ## Run a sweep grid: make sweep SWEEP=configs/sweeps/<name>.yaml [BACKEND=local|wandb]
	$(BIN)/fuse sweep $(SWEEP) --data_dir $(DATA_DIR) --backend $(BACKEND)

bench: ## Benchmarks as ratios (Lightning vs plain loops, FLOP bound, time to a protected set); docs/benchmarks.md
	$(BIN)/python -m fuse_lightning.bench --data_dir $(DATA_DIR) --json outputs/bench.json

gpu-check: ## The whole GPU path in ~6 min on one GPU; report in experiments/results/gpu_check (ARGS=--dry_run to print the plan)
	$(BIN)/python -m fuse_lightning.gpu_check --data_dir $(DATA_DIR) $(ARGS)

clean: ## Remove logs and caches (keeps .venv and experiments/results)
	rm -rf logs lightning_logs wandb .pytest_cache .ruff_cache

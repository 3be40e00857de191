# The project's verbs. Each bootstraps uv (pip-installs it) and the locked environment when missing.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONWARNINGS := ignore

.PHONY: demo test test-fast lint install clean-demo gpu-check gpu-check-smoke

# Where the demo's data and outputs go: $AUDIOGEN_HOME (and $AUDIOGEN_OUTPUTS) when set, as for every command.
DATA = $(if $(AUDIOGEN_HOME),$(AUDIOGEN_HOME),.)
OUTPUTS = $(if $(AUDIOGEN_OUTPUTS),$(AUDIOGEN_OUTPUTS),$(DATA)/outputs)

$(UV):
	$(PYTHON) -m pip install --user --quiet uv || $(PYTHON) -m pip install --user --quiet --break-system-packages uv

# --compile-bytecode: every later process (each CLI, each `dora run`, each test subprocess) reads .pyc files instead of
# compiling torch/audiocraft/transformers again, which matters where PYTHONDONTWRITEBYTECODE is set (about 7 s each).
$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --compile-bytecode
	@touch $@

install: $(VENV)/.synced

# Offline CPU demo: a tiny stand-in "pretrained" on 4 synthetic sound classes (codec + LM, built once and cached in
# ~/.cache/audiogen-finetune) is fine-tuned on 3 classes it doesn't know; a fixed classifier scores its prompts before/after.
demo: $(VENV)/.synced
	$(PY) -m scripts.make_tiny_package --trained
	$(PY) -m scripts.make_demo_data $(DATA)/data/demo_raw --classes new --per-class 16
	$(PY) -m scripts.prepare_dataset $(DATA)/data/demo_raw --name demo
	$(VENV)/bin/dora run solver=audiogen/demo
	@$(PY) -m scripts.show_xp solver=audiogen/demo
	@$(PY) -m scripts.demo_report solver=audiogen/demo

# pytest-xdist workers: one per core plus one for the SLURM tests, which mostly wait for SLURM (tests/conftest.py);
# tests sharing a costly fixture or the local SLURM stay on one worker (conftest groups them); the longest units are
# handed out first, in conftest's order, which --no-loadscope-reorder keeps (xdist would sort them by test count).
test: $(VENV)/.synced
	$(PY) -m pytest -n auto --dist loadgroup --no-loadscope-reorder

test-fast: $(VENV)/.synced
	$(PY) -m pytest -n auto --dist loadgroup --no-loadscope-reorder -m "not slow and not slurm"

# Every GPU claim of the README and docs on one CUDA GPU, in minutes, no download (benchmarks/gpu_check.py): the gpu
# tests, bf16/fp16 steps of medium's architecture (full and LoRA) with peak memory beside the planner, decoding speed.
gpu-check: $(VENV)/.synced
	$(PY) benchmarks/gpu_check.py

# The same script on the CPU at tiny shapes (CI runs it through tests/test_gpu_check.py so it can't rot).
gpu-check-smoke: $(VENV)/.synced
	$(PY) benchmarks/gpu_check.py --smoke

lint: $(VENV)/.synced
	$(VENV)/bin/ruff check solvers scripts tests benchmarks hatch_build.py
	$(VENV)/bin/ruff format --check solvers scripts tests benchmarks hatch_build.py
	$(VENV)/bin/mypy

# Removes what make demo wrote, in the clone or under $AUDIOGEN_HOME: its XP and TensorBoard link, data, manifests,
# preset and stand-in package (the build cache stays: rm -rf ~/.cache/audiogen-finetune).
clean-demo:
	-@test -f $(DATA)/config/dataset/demo.yaml && xp="$$($(PY) -m scripts.show_xp --folder solver=audiogen/demo)" && \
		rm -rf "$$xp" $(OUTPUTS)/tensorboard/demo_"$$(basename "$$xp")"
	rm -rf $(DATA)/data/demo_raw $(DATA)/data/demo $(DATA)/egs/demo $(DATA)/config/dataset/demo.yaml \
		$(OUTPUTS)/pretrained/tiny

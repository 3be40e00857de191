# The project's verbs. Each bootstraps uv (pip-installs it) and the locked environment when missing.
SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONWARNINGS := ignore

.PHONY: demo test test-fast lint install clean-demo

$(UV):
	$(PYTHON) -m pip install --user --quiet uv || $(PYTHON) -m pip install --user --quiet --break-system-packages uv

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	@touch $@

install: $(VENV)/.synced

# Offline CPU demo: synthesise captioned sounds, prepare them, build the tiny stand-in package, fine-tune it.
demo: $(VENV)/.synced
	$(PY) -m scripts.make_demo_data data/demo_raw
	$(PY) -m scripts.prepare_dataset data/demo_raw --name demo
	$(PY) -m scripts.make_tiny_package
	$(VENV)/bin/dora run solver=audiogen/demo
	@$(PY) -m scripts.show_xp solver=audiogen/demo

test: $(VENV)/.synced
	$(PY) -m pytest

test-fast: $(VENV)/.synced
	$(PY) -m pytest -m "not slow and not slurm"

lint: $(VENV)/.synced
	$(VENV)/bin/ruff check solvers scripts tests benchmarks
	$(VENV)/bin/mypy

clean-demo:
	rm -rf data/demo_raw data/demo egs/demo outputs/pretrained/tiny

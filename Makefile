# SimMerge kit — `make run` (the course, profile default) and `make test` (pytest + every notebook in smoke, nbval).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The set-up stamp is keyed by the dependency list, so `make` re-installs only when pyproject.toml changes.
DEPS_KEY := $(shell cat pyproject.toml | sha256sum | cut -c1-12)
STAMP := $(VENV)/.deps-$(DEPS_KEY)
LAB_STAMP := $(VENV)/.lab-$(DEPS_KEY)
NOTEBOOKS ?=

# Keep Jupyter, IPython and matplotlib state inside the project, and never reach a model hub.
export MPLCONFIGDIR := $(CURDIR)/build/.config/matplotlib
export JUPYTER_CONFIG_DIR := $(CURDIR)/build/.config/jupyter
export IPYTHONDIR := $(CURDIR)/build/.config/ipython
export JUPYTER_PLATFORM_DIRS := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HOME := $(CURDIR)/build/.cache/huggingface
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup run test test-lib test-notebooks lab bench clean

setup: $(STAMP)

build/.config:
	@mkdir -p build/.config/matplotlib build/.config/jupyter build/.config/ipython

$(STAMP): pyproject.toml | build/.config
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 needed, found " + sys.version' \
		|| { echo "error: set PYTHON=python3.11 (or any Python >= 3.10)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setting up $(VENV) (torch 2.13.0 CPU + the kit with its dev extras)…"
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name simmerge --display-name "SimMerge kit" >/dev/null
	@rm -f $(VENV)/.deps-* && touch $@

# The runner streams each chapter's progress (cell k of n, the long step's bar) and ends with a summary table.
run: setup
	$(PY) -m simmerge_lib.runner --profile default --out build/notebooks $(NOTEBOOKS)

test: test-lib test-notebooks

test-lib: setup
	$(PY) -m pytest -q tests

# The runner executes every chapter on the smoke profile (failing on the first cell that raises, as nbval's lax mode
# did) and keeps the executed copies, so a last pytest step can read what a learner would see: no warning and no stray
# progress bar on stderr (tests/test_executed_notebooks.py; see README "Testing").
test-notebooks: setup
	$(PY) -m simmerge_lib.runner --profile smoke --out build/notebooks/smoke $(NOTEBOOKS)
	SIMMERGE_EXECUTED=build/notebooks/smoke $(PY) -m pytest -q -p no:cacheprovider tests/test_executed_notebooks.py

# JupyterLab is installed once per dependency list, like the kit itself; the lab is rooted at the project so the
# course (notebooks/) and the last run (build/notebooks/) are both open to the learner.
$(LAB_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,lab]"
	@rm -f $(VENV)/.lab-* && touch $@

lab: $(LAB_STAMP)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir="$(CURDIR)" --ServerApp.default_url=/lab/tree/notebooks \
		$(if $(filter 0,$(shell id -u)),--allow-root,)

bench: setup
	@mkdir -p build/bench
	@set -e; for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script; done

clean:
	rm -rf build $(VENV) *.egg-info .pytest_cache

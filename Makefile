# lightning-hpsgd: every install step lives here, so CI and users get the same environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the release whose wheels this machine already holds; a different one downloads several GB.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
PYTEST_WORKERS ?= 2

.PHONY: install test lint demo bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PIN)
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) --durations=10 tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check lightning_hpsgd tests recipes
	$(VENV)/bin/ruff format --check lightning_hpsgd tests recipes

# Trains the MNIST-1D recipe with HPSGD on 2 CPU processes (data generated locally), tests it, prints a table.
demo: $(VENV)/.installed
	$(PY) -m lightning_hpsgd.recipes.demo --config recipes/mnist1d.yaml

bench: $(VENV)/.installed
	$(PY) -m lightning_hpsgd.bench overlap

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs *.egg-info

# lightning-hpsgd: every install step lives here, so CI and users get the same environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the release whose wheels this machine already holds; a different one downloads several GB.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
PYTEST_WORKERS ?= 3

.PHONY: install test lint docs demo bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[all,test,docs]' $(TORCH_PIN)
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed lint docs
	$(PY) -m pytest -n $(PYTEST_WORKERS) --maxschedchunk 2 --durations=10 tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check lightning_hpsgd tests recipes docs
	$(VENV)/bin/ruff format --check lightning_hpsgd tests recipes docs

# The documentation site (MkDocs Material, API reference from docstrings) in site/; --strict: a broken link,
# a missing page or a docstring warning fails the build. The overview's figures are drawn first, and the Benchmarks
# page's convergence charts from that page's own tables.
docs: $(VENV)/.installed
	$(PY) docs/scripts/figures.py docs/img
	$(PY) docs/scripts/convergence_figures.py docs/img
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# Trains the MNIST-1D recipe with HPSGD on 2 CPU processes (data generated locally), tests it, prints a table.
demo: $(VENV)/.installed
	$(PY) -m lightning_hpsgd.recipes.demo --config recipes/mnist1d.yaml

# HPSGD against DDP, post-local SGD and compute-only, each worker in its own network namespace behind a link
# calibrated to the comm/compute ratio (root and iproute2; otherwise loopback, with a warning). About 10 minutes.
BENCH_OUT ?= bench_results
bench: $(VENV)/.installed
	$(PY) -m lightning_hpsgd.bench --out $(BENCH_OUT) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs checkpoints plots bench_results site *.egg-info

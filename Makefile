# Shortcuts for the README's commands; .ci/run runs the README's test command itself.
PYTHON ?= python
WORKDIR ?= workdirs/vit_tiny

.PHONY: install install-test train test lint format bench

install:
	$(PYTHON) -m pip install -e .

install-test:
	$(PYTHON) -m pip install -e '.[test,tfds-build]'

train: install
	$(PYTHON) -m vitok.train --config=configs/vit.py:tiny --workdir=$(WORKDIR)

test: install-test
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format . && $(PYTHON) -m ruff check --fix .

bench:
	$(PYTHON) experiments/benchmarks/train_step.py

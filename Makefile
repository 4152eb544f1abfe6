# `make run` and `make test` bootstrap .venv on a fresh machine (same tested versions:
# constraints.txt), then do their job. Extra args: make run ARGS="ppo.steps=20"  make test PYTEST_ARGS="-k data"
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint format validate clean-state

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	# torch first and pinned: the CPU wheel; any other torch spec pulls GBs of CUDA wheels
	$(BIN)/python -m pip install -q "torch==2.13.0" -c constraints.txt
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,services]"
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/rlhf run $(ARGS)

# our code compiled once: the suite's ~100 subprocesses then read it, even where PYTHONDONTWRITEBYTECODE is set
test: $(STAMP)
	@$(BIN)/python -m compileall -q components flows service cli > /dev/null
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff (pyproject.toml [tool.ruff]): formatting and lint; mypy ([tool.mypy]): types of components/ and
# flows/contracts.py. As CI runs them (and .pre-commit-config.yaml); `make format` fixes what ruff can
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

validate: $(STAMP)
	$(BIN)/rlhf validate $(ARGS)

# Removes local state (MLflow db, Prefect home, DVC remote, caches); data/ stays.
clean-state:
	rm -rf .rlhf

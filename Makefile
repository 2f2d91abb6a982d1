# loraserve: `make test` and `make serve` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned apart from the rest: 2.13.0 is a CPU build that installs from local disk;
# letting pip choose would pull a multi-GB CUDA build. On a GPU machine, install torch first
# and run `make TORCH_SPEC=torch test` (or any spec) to keep it.
TORCH_SPEC ?= torch==2.13.0 triton==3.9.0
PORT ?= 8000

.PHONY: venv test lint typecheck pytest serve clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

# The bundled demo model and its adapters on 127.0.0.1:$(PORT) (`make serve PORT=N`).
serve: venv
	$(BIN)/loraserve serve --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info

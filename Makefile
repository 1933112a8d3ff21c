# textgen: one command to set up and serve, one to test.
#   make serve   - create .venv, install, pull the offline default model if needed, serve on 127.0.0.1:8000
#   make test    - create .venv, install, run lint, types and the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# This machine's CPU wheel of torch; a CUDA machine can set TORCH_SPEC=torch (or a CUDA index) instead.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install serve test lint typecheck pytest bench models clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[dev,eval,bench]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/textgen serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check app tests

typecheck: $(STAMP)
	$(BIN)/mypy

# Two processes: the tests that load models of their own (marker own_process) apart from the rest, so that
# no process holds every model at once (one process peaked at 24.2 GB on a 24 GB machine).
pytest: $(STAMP)
	TEXTGEN_TEST_PROCESS=shared $(BIN)/python -m pytest -q $(PYTEST_ARGS) || [ $$? -eq 5 ]  # 5: none selected
	TEXTGEN_TEST_PROCESS=own $(BIN)/python -m pytest -q $(PYTEST_ARGS) || [ $$? -eq 5 ]

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/textgen bench --compare $(ARGS)

models: $(STAMP)
	$(BIN)/textgen models

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

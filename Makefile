# The two commands: `make demo` and `make test`. Both create .venv when missing; `make test`
# also installs the system packages the tests need (.ci/system-deps; as root, or it says what to run).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test system-deps lint typecheck unit bench loadtest clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m gateway demo

test: system-deps $(STAMP)
	$(BIN)/ruff check gateway tests loadtest
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

system-deps:
	PY=$(PY) .ci/system-deps

lint: $(STAMP)
	$(BIN)/ruff check gateway tests loadtest

bench: system-deps $(STAMP)
	$(BIN)/python -m loadtest.overhead

loadtest: $(STAMP)
	$(BIN)/python -m gateway loadtest

clean:
	rm -rf $(VENV) results .mypy_cache .pytest_cache .ruff_cache

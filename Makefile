# qpq — the two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench venv sysdeps render clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests drive for real (promtool, prometheus, docker-compose).
sysdeps:
	@bash scripts/install-sysdeps.sh

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check qpq_server qpq_ops tests bench scripts
	$(BIN)/mypy

typecheck: lint

pytest: $(STAMP) sysdeps
	$(BIN)/pytest -n 2 --dist loadfile

test: $(STAMP) sysdeps lint pytest

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

render: $(STAMP)
	$(BIN)/qpq-ops render all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

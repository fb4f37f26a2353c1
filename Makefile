# qpq — the two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The suite starts hundreds of Python processes (servers, CLIs, every Ansible task); some
# machines set PYTHONDONTWRITEBYTECODE, which makes each of them compile its modules anew.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-fast test-host lint typecheck pytest bench venv sysdeps render clean soak ceiling

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

# Test processes for `make pytest`: three on two cores, because many tests wait (for a
# Prometheus scrape, a timeout, a restart) while the others keep both cores busy (measured
# on 2 cores: 713 s with 3, 802 s with 2, the same CPU time). `make test JOBS=N` to change.
JOBS ?= 3

# The whole suite, tests/host included: one file per worker at a time (module fixtures deploy
# once per file), so the systemd host fills the gaps the other files leave.
pytest: $(STAMP) sysdeps
	$(BIN)/pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder --durations=30

# deploy.yml on a Debian 12 root booted with systemd as PID 1 (needs root; the root file
# system is built once by debootstrap and cached in /var/cache/qpq-test-host). Part of
# `make pytest`; this target runs it alone.
test-host: $(STAMP) sysdeps
	$(BIN)/pytest tests/host -q -s

test: $(STAMP) sysdeps lint pytest

# In-process and unit tests only (no Prometheus, no Ansible): under a minute on 2 cores.
FAST_TESTS := tests/server/test_dispatch.py tests/server/test_codec.py \
	tests/server/test_units.py tests/server/test_e2e_crypto.py tests/test_public_api.py \
	tests/test_import_boundaries.py tests/storage/test_contract.py \
	tests/storage/test_filestore.py tests/ops/test_capacity.py \
	tests/ops/test_triggers_definition.py tests/bundle/test_generated_files.py \
	tests/test_cli_usage_exit_codes.py tests/ops/test_forecast_fit.py

test-fast: $(STAMP)
	$(BIN)/pytest -n 2 -q $(FAST_TESTS)

# The fault / fuzz / load harness, longer (issue 17): 50 kill -9 rounds, 20x the
# hypothesis examples, 10 minutes of atheris, 60 s of load from 200 clients.
soak: $(STAMP) sysdeps
	QPQ_SOAK=1 $(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder -q -s --timeout 3600 tests/fuzz tests/faults

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

# qpq against a bare aioquic echo server in one run (issue 17); needs qpq_server.devserver.
ceiling: $(STAMP)
	$(BIN)/python bench/ceiling.py

render: $(STAMP)
	$(BIN)/qpq-ops render all

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

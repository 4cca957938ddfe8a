# The two set-up commands of the README: `make demo` and `make test` (each creates .venv on first use).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: demo test typecheck unit e2e benchmark mutate mutate-sample clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -qq --disable-pip-version-check -e ".[test]"  # -qq: errors only (no index or build warnings)
	touch $@

demo: $(VENV)/.installed  # local-only vs FedAvg vs FedAvg + DP on the BreastMNIST shipped with medfed (README)
	$(VENV)/bin/medfed demo

test: $(VENV)/.installed
	$(PY) tests/typecheck.py
	$(PY) -m pytest -q --durations=30 tests  # the 30 slowest tests listed: CI has a time budget

typecheck: $(VENV)/.installed
	$(PY) tests/typecheck.py

unit: $(VENV)/.installed
	$(PY) -m pytest -q tests/unit

e2e: $(VENV)/.installed
	$(PY) -m pytest -q tests/e2e

mutate: $(VENV)/.installed
	$(PY) tests/mutate.py

mutate-sample: $(VENV)/.installed
	$(PY) tests/mutate.py --sample '[13579]7'  # a fixed twentieth: CI's whole run has a 45-minute budget

benchmark: $(VENV)/.installed
	$(PY) benchmarks/baselines.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache

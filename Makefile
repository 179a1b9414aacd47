# Two commands for a fresh machine:
#   make demo   set up .venv and fit the bundled osmFISH data -> demo_output/
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sfact-installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/sfact demo --output demo_output

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE MPLBACKEND=Agg $(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache

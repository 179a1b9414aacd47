# Two commands for a fresh machine:
#   make demo   set up .venv and fit the bundled osmFISH data -> demo_output/
#   make test   set up .venv and run the test suite (make test-fast: without the slow tests)
# Documentation (a separate .venv-docs with the `docs` extra):
#   make docs       build the site into docs/_build/html (warnings are errors)
#   make tutorials  re-run the tutorial notebooks in docs/tutorials/ and save their outputs
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sfact-installed
DOCS_VENV ?= .venv-docs
DOCS_PY := $(DOCS_VENV)/bin/python
DOCS_STAMP := $(DOCS_VENV)/.sfact-docs-installed

.PHONY: setup demo test test-fast lint bench docs tutorials clean

# $(call make_venv,VENV_DIR,EXTRAS,STAMP): a virtual environment with sfact[EXTRAS] and the pins
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q -c constraints.txt -e ".[$(2)]"
	touch $(3)
endef

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(call make_venv,$(VENV),dev,$(STAMP))

demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/sfact demo --output demo_output

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE MPLBACKEND=Agg $(PY) -m pytest -q tests

# the suite without the tests marked `slow`, for quick iterations
test-fast: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE MPLBACKEND=Agg $(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/bench_engine.py

$(DOCS_STAMP): pyproject.toml constraints.txt
	$(call make_venv,$(DOCS_VENV),docs,$(DOCS_STAMP))

docs: $(DOCS_STAMP)
	$(DOCS_VENV)/bin/sphinx-build -W -n --keep-going -b html docs docs/_build/html

tutorials: $(DOCS_STAMP)
	OMP_WAIT_POLICY=PASSIVE $(DOCS_PY) docs/tutorials/run_tutorials.py

clean:
	rm -rf $(VENV) $(DOCS_VENV) demo_output .pytest_cache docs/_build docs/generated

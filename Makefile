# Every target sets up .venv first when it is missing (or older than pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lightning-sbp compare --config examples/compare/digits.yaml --output runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/omp.py
	$(BIN)/python benchmarks/scoring_quality.py

lint: $(STAMP)
	$(BIN)/ruff check lightning_sbp tests benchmarks examples
	$(BIN)/ruff format --check lightning_sbp tests benchmarks examples
	$(BIN)/mypy lightning_sbp

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) site runs .pytest_cache .mypy_cache .ruff_cache

# Every target sets up .venv first when it is missing (or older than pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-threads test-packaging test-floor test-gpu bench lint docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lightning-sbp demo --output runs/demo

# The tests run in a random order (pytest-randomly; the seed is printed at the end, --randomly-seed=N replays
# it) and list the slowest ones, so that a slow test is seen when it lands.
PYTEST_FLAGS := -q -p no:cacheprovider --durations=15
# The tests of the numerical code, run again at two intra-op threads by test-threads: another thread count
# sums in another order.
NUMERIC_TESTS := tests/test_functional_*.py tests/test_metrics.py tests/test_selectors*.py tests/test_omp_weights.py \
	tests/test_tracking_sketch.py

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_FLAGS)

# The training run of test_omp_weights compares accuracies, not arithmetic; at two threads it only waits on them.
test-threads: $(STAMP)
	SBP_TEST_THREADS=2 $(BIN)/python -m pytest $(PYTEST_FLAGS) $(NUMERIC_TESTS) \
		--deselect tests/test_omp_weights.py::test_default_omp_keeps_up_with_uniform_weights_on_a_noisy_binary_task

# The demo from a built wheel in a fresh virtual environment (about half a minute; left out of `make test`).
test-packaging: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m packaging tests/test_packaging.py

# The core tests against the dependency floors of pyproject.toml, in a venv of their own. Lightning 2.3
# imports pkg_resources, which setuptools 81 removed. torch is the newest this machine's pip serves.
FLOOR_VENV := .venv-floor
FLOOR_STAMP := $(FLOOR_VENV)/.installed
FLOOR_PINS := lightning==2.3.0 torchmetrics==1.0.0 'jsonargparse[signatures]==4.27.7' 'setuptools<81'
FLOOR_TOOLS := pytest pytest-randomly scikit-learn scipy tensorboard
# The tests of what touches lightning, torchmetrics and jsonargparse; the pure tensor code (functional, selectors)
# runs on the same torch in both environments, so the main run covers it.
FLOOR_TESTS := tests/test_callback.py tests/test_metrics.py tests/test_mixin.py tests/test_schedule.py \
	tests/test_imports.py tests/test_selection_step.py tests/test_mixed_precision.py

$(FLOOR_STAMP): pyproject.toml
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/pip install --quiet --no-compile -e . $(FLOOR_PINS) $(FLOOR_TOOLS)
	touch $(FLOOR_STAMP)

test-floor: $(FLOOR_STAMP)
	$(FLOOR_VENV)/bin/python -m pytest $(PYTEST_FLAGS) $(FLOOR_TESTS)

# The GPU checks: the tests marked gpu, then benchmark rows on the GPU. No set-up step and no network: it runs
# with the interpreter at hand (.venv's when there is one), which needs the package and its test requirements.
# Without a CUDA device it says so in one line and stops.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

test-gpu:
	@if ! $(GPU_PYTHON) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		echo "test-gpu: skipped, torch sees no CUDA device on this machine"; exit 0; fi; \
	set -e; \
	$(GPU_PYTHON) -m pytest -q -p no:cacheprovider -m gpu tests; \
	$(GPU_PYTHON) benchmarks/step_time.py --accelerator gpu --keeps 0.25 --rounds 2; \
	$(GPU_PYTHON) benchmarks/omp.py --device cuda --sizes 256 1024; \
	$(GPU_PYTHON) benchmarks/sequence_gram.py --device cuda

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
	rm -rf $(VENV) $(FLOOR_VENV) site runs .pytest_cache .mypy_cache .ruff_cache

# Two commands set everything up on a fresh machine with Python 3.11 and pip:
#   make run   - create .venv, install reco_lab, run the study on MovieLens-100k (embedded MLflow store)
#   make test  - install the dev extras into the same .venv and run the whole test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
RUN_ARGS ?=

.PHONY: run test install install-dev sync-check nbdev-test pytest clean-nbs export readme serve profile bench-serve bench-als bench-scale

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

$(RUN_STAMP): settings.ini setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(DEV_STAMP): settings.ini setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(RUN_STAMP) $@

install: $(RUN_STAMP)
install-dev: $(DEV_STAMP)

run: $(RUN_STAMP)
	$(BIN)/reco-lab run $(RUN_ARGS)

test: $(DEV_STAMP)
	$(MAKE) --no-print-directory sync-check nbdev-test pytest

# the library must be exactly what the notebooks export
sync-check: $(DEV_STAMP)
	PATH=$(abspath $(BIN)):$$PATH scripts/check-sync .

# the notebooks' own tests; their MLflow runs go to a throw-away store
nbdev-test: $(DEV_STAMP)
	export MLFLOW_TRACKING_URI=sqlite:///$$(mktemp -d)/mlflow.db && \
	$(BIN)/python -c "from reco_lab.tracking import check_tracking; check_tracking()" && \
	$(BIN)/nbdev_test --n_workers 2 --timing

pytest: $(DEV_STAMP)
	$(BIN)/python -m pytest tests -q

# authoring helpers
export: $(DEV_STAMP)
	$(BIN)/nbdev_export
clean-nbs: $(DEV_STAMP)
	$(BIN)/nbdev_clean
readme: $(DEV_STAMP)
	$(BIN)/jupyter nbconvert --to markdown --output-dir . --output README nbs/index.ipynb

# the service and the tools around it (after `make run` has written models/)
serve: $(RUN_STAMP)
	$(BIN)/reco-lab serve
profile: $(RUN_STAMP)
	$(BIN)/reco-lab profile
bench-serve: $(RUN_STAMP)
	$(BIN)/reco-lab bench serve
bench-als: $(RUN_STAMP)
	$(BIN)/reco-lab bench als-logging --report reports/bench_als_logging.md
bench-scale: $(RUN_STAMP)
	$(BIN)/reco-lab bench scale

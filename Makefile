# Two commands set everything up on a fresh machine with Python 3.11 and pip:
#   make run   - create .venv, install reco_lab, run the study on MovieLens-100k (embedded MLflow store)
#   make test  - install the dev extras (and Ray, reco_lab[scale]) into the same .venv, the system parts the tests use (as root with apt:
#                PostgreSQL, docker.io, docker-compose, debootstrap, wrk) and run the whole test suite
# The images (a Docker engine; wheels downloaded on the host, no network inside the builds):
#   make docker-image         - reco-lab-service, the API
#   make docker-mlflow-image  - reco-lab/mlflow:<version>, the tracking server of the compose tracking profiles
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
LIGHTFM_STAMP := $(VENV)/.installed-lightfm
JUPYTER_CONFIG := $(VENV)/etc/jupyter/jupyter_server_config.json
RUN_ARGS ?=

.PHONY: run test lint lock install install-dev system-parts sync-check nbdev-test pytest clean-nbs export readme docs lab serve profile bench-serve bench-als bench-scale bench-scale-out docker-base docker-image docker-mlflow-image

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel

# what was tested: the versions of constraints/py<version>.txt (3.11, 3.12, 3.13), when this Python has one
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LOCK := $(wildcard constraints/py$(PYVER).txt)
PIP_INSTALL := $(BIN)/python -m pip install --quiet $(if $(LOCK),--constraint $(LOCK))
RUN_EXTRAS := service,registry,stack,profile

# LightFM ships as source and its build adds -march=native -ffast-math: a binary for this CPU only, whose training
# then differs from machine to machine (the study's LightFM numbers did). LIGHTFM_NO_CFLAGS=1 (its own switch)
# builds it portable; --no-cache-dir keeps pip from reusing a wheel it built the other way before.
$(LIGHTFM_STAMP): $(LOCK) | $(BIN)/python
	LIGHTFM_NO_CFLAGS=1 $(PIP_INSTALL) --no-cache-dir --no-binary rectools-lightfm --no-deps --force-reinstall \
		"rectools-lightfm$(if $(LOCK),,==1.17.3)"
	touch $@

$(RUN_STAMP): settings.ini setup.py $(LOCK) $(LIGHTFM_STAMP) | $(BIN)/python
	$(PIP_INSTALL) -e ".[$(RUN_EXTRAS)]"
	touch $@

$(DEV_STAMP): settings.ini setup.py $(LOCK) $(LIGHTFM_STAMP) | $(BIN)/python $(JUPYTER_CONFIG)
	$(PIP_INSTALL) -e ".[$(RUN_EXTRAS),scale,lab,dev]"
	touch $(RUN_STAMP) $@

# the project's Jupyter server configuration (configs/jupyter/), linked into the venv so that every `jupyter lab` of
# it reads it: saving a notebook runs nbdev_clean on it (a save without an edit leaves the file as it was), and the
# lab asks no server on the internet for news, updates or extensions
$(JUPYTER_CONFIG): | $(BIN)/python
	mkdir -p $(@D)
	ln -sfn $(abspath configs/jupyter/jupyter_server_config.json) $@

# the lock of this Python's tested versions, from the dev environment (after a change of requirements and a green make test)
lock: $(DEV_STAMP)
	mkdir -p constraints
	{ echo "# pip constraints: the versions make test passed with on Python $(PYVER) (make lock)"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v '^reco_lab'; } > constraints/py$(PYVER).txt

install: $(RUN_STAMP)
install-dev: $(DEV_STAMP)

run: $(RUN_STAMP)
	$(BIN)/reco-lab run $(RUN_ARGS)

test: $(DEV_STAMP) system-parts
	$(MAKE) --no-print-directory sync-check lint nbdev-test pytest

# PostgreSQL's server, the Docker engine, docker-compose, debootstrap and wrk: installed with apt when run as root,
# else listed as missing (the tests that need them skip and say why)
system-parts:
	@scripts/install-system-parts

# the library must be exactly what the notebooks export
sync-check: $(DEV_STAMP)
	PATH=$(abspath $(BIN)):$$PATH scripts/check-sync .

# ruff (pyproject.toml): lint the notebooks, the library they export, the tests and scripts; the notebooks and tests
# are formatted with it (reco_lab/ is nbdev's output, so it is checked, never formatted); then mypy type-checks the
# library ([tool.mypy] in pyproject.toml)
lint: $(DEV_STAMP)
	$(BIN)/ruff check reco_lab nbs tests scripts docker
	$(BIN)/ruff format --check nbs tests scripts docker
	$(BIN)/mypy

# the notebooks' own tests; their MLflow runs go to a throw-away store
nbdev-test: $(DEV_STAMP)
	export MLFLOW_TRACKING_URI=sqlite:///$$(mktemp -d)/mlflow.db && \
	MLFLOW_LOGGING_LEVEL=WARNING $(BIN)/python -c "from reco_lab.tracking import check_tracking; check_tracking()" && \
	$(BIN)/nbdev_test --n_workers 2 --timing

# -rs: every skipped test says why (a missing system part, no Docker engine)
pytest: $(DEV_STAMP)
	$(BIN)/python -m pytest tests -q -rs

# authoring helpers
export: $(DEV_STAMP)
	$(BIN)/nbdev_export
clean-nbs: $(DEV_STAMP)
	$(BIN)/nbdev_clean
# JupyterLab on the notebooks, from the repository root: nbdev's save hook finds settings.ini from the notebook's path
# relative to the server's working directory
lab: $(DEV_STAMP) $(JUPYTER_CONFIG)
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root)
# README.md is nbs/index.ipynb executed: its results tables are rendered from the committed reports; the configuration
# guide is written from the settings classes
readme: $(DEV_STAMP)
	$(BIN)/jupyter nbconvert --to markdown --execute --TagRemovePreprocessor.remove_input_tags=remove_input \
		--output-dir . --output README nbs/index.ipynb
	$(BIN)/python -c "from reco_lab.reports import configuration_page as p; open('docs/guides/configuration.md', 'w').write(p())"
# the HTML site in _docs/ (open _docs/index.html): every notebook with its show_doc entries, the API reference, the
# README as index, the committed reports, offline search (scripts/build-docs, mkdocs.yml)
docs: $(DEV_STAMP)
	$(BIN)/python scripts/build-docs

# the service and the tools around it (after `make run` has written models/)
serve: $(RUN_STAMP)
	$(BIN)/reco-lab serve
profile: $(RUN_STAMP)
	$(BIN)/reco-lab profile
bench-serve: $(RUN_STAMP)
	$(BIN)/reco-lab bench serve
bench-als: $(RUN_STAMP)
	$(BIN)/reco-lab bench als-logging --report reports/bench_als_logging.md
# the whole pipeline at 1M synthetic users with the defaults issue 16's goals are judged on (`reco-lab bench scale
# --help`, reco_lab.bench.ScaleParams); writes reports/benchmarks.md
bench-scale: $(RUN_STAMP)
	$(BIN)/reco-lab bench scale
# reco-lab score on Ray against one process at 1M users, the scoring kernel's references, growth to 10M users
# (reco_lab.bench.ScaleOutParams); needs reco_lab[scale] (make test installs it); writes reports/scale_out.md
bench-scale-out: $(DEV_STAMP)
	$(BIN)/reco-lab bench scale-out

# the images; DOCKER is the CLI, PYTHON_IMAGE the base (where no registry answers: scripts/build-python-standin)
DOCKER ?= docker
PYTHON_IMAGE ?= python:3.11.11-slim-bookworm
SERVICE_IMAGE ?= reco-lab-service
MLFLOW_IMAGE ?= reco-lab/mlflow:$(shell sed -n 's/^mlflow==//p' docker/mlflow-requirements.txt)
docker-base:
	@$(DOCKER) image inspect $(PYTHON_IMAGE) >/dev/null 2>&1 || $(DOCKER) pull $(PYTHON_IMAGE) >/dev/null || { \
	  echo "make: no base image $(PYTHON_IMAGE) and no registry to pull it from; build the local stand-in with" >&2; \
	  echo "  scripts/build-python-standin   then   make $(MAKECMDGOALS) PYTHON_IMAGE=reco-lab/python-standin:3.11-bookworm" >&2; \
	  exit 1; }
docker-image: docker-base | $(RUN_STAMP)
	PYTHON=$(BIN)/python scripts/docker-wheels docker/service-requirements.txt docker/wheels/service "setuptools>=64"
	$(DOCKER) build --network none --build-arg PYTHON_IMAGE=$(PYTHON_IMAGE) -t $(SERVICE_IMAGE) .
docker-mlflow-image: docker-base | $(RUN_STAMP)
	PYTHON=$(BIN)/python scripts/docker-wheels docker/mlflow-requirements.txt docker/wheels/mlflow
	$(DOCKER) build --network none --build-arg PYTHON_IMAGE=$(PYTHON_IMAGE) -f docker/mlflow.Dockerfile -t $(MLFLOW_IMAGE) docker

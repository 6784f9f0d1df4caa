# Workbench — two commands on a fresh machine:
#   make up     install what is missing into .venv, then run the embedded workbench on http://127.0.0.1:8000
#   make test   install what the tests need, then run them
SHELL := /bin/bash
VENV ?= .venv
# Debian's Python: a venv made from it can be executed by the per-user accounts servers run as
SYSTEM_PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
STAMP := $(VENV)/.workbench-installed
LAB_EXTENSION := extensions/workbench-notifications
LAB_EXTENSION_OUT := src/workbench/labextension
ARGS ?=
PYTEST_ARGS ?=

.PHONY: up test install unit integration bench check clean help lint

help:
	@echo "make up      run the embedded workbench (ARGS='--port 8080 ...' passes options to 'workbench up')"
	@echo "make test    run the whole test suite (unit + chart beside integration + browser on LIVE_WORKERS=2; PARALLEL=0: one run)"
	@echo "make lint    ruff: lint, import order, format check"
	@echo "make unit    run the fast unit tests only"
	@echo "make bench   run the benchmarks (prints medians and ratios)"
	@echo "make check   validate hub_config/demo.yaml"
	@echo "make lock    refresh requirements-lock.txt (the versions make install uses) within pyproject.toml's ranges"
	@echo "make lab-extension  rebuild the JupyterLab notifications extension into $(LAB_EXTENSION_OUT) (commit it)"

$(STAMP): pyproject.toml requirements-lock.txt scripts/system-deps.sh
	@scripts/system-deps.sh
	@test -x $(VENV)/bin/python || $(SYSTEM_PYTHON) -m venv $(VENV)
	@echo "[workbench] installing Python packages into $(VENV) …"
	@$(VENV)/bin/python -m pip install -qq --upgrade pip
	@$(VENV)/bin/python -m pip install -qq -c requirements-lock.txt -e '.[test]'
	@# an editable install skips pyproject's data-files: link the JupyterLab notifications in (see README)
	@mkdir -p $(VENV)/etc/jupyter/jupyter_server_config.d $(VENV)/share/jupyter/labextensions
	@ln -sfn $(CURDIR)/jupyter-config/jupyter_server_config.d/workbench.json $(VENV)/etc/jupyter/jupyter_server_config.d/workbench.json
	@ln -sfn $(CURDIR)/jupyter-config/jupyter_jupyter_scheduler_config.json $(VENV)/etc/jupyter/jupyter_jupyter_scheduler_config.json
	@ln -sfn $(CURDIR)/$(LAB_EXTENSION_OUT) $(VENV)/share/jupyter/labextensions/workbench-notifications
	@echo "[workbench] installing configurable-http-proxy into $(VENV) …"
	@npm install --prefix $(VENV) --no-audit --no-fund --loglevel=error configurable-http-proxy@4 >/dev/null
	@ln -sf ../node_modules/.bin/configurable-http-proxy $(VENV)/bin/configurable-http-proxy
	@touch $@

install: $(STAMP)

up: install
	$(VENV)/bin/workbench up $(ARGS)

# `make test` runs two pytest processes at once (PARALLEL=0: the whole of tests/ in one, as before):
#   FAST_TESTS  tests that start no workbench, create no Unix account and submit no Slurm job (pure code, the
#               chart rendered, the hub pod's entry point on free ports, image locks in a fresh venv); under
#               `nice`, so that the live tests' timers keep the CPU first
#   LIVE_TESTS  real workbenches, Slurm and browsers, on LIVE_WORKERS pytest-xdist workers: a module runs whole on
#               one worker, each worker but the first in its own account namespace (WORKBENCH_ACCOUNT_PREFIX=wb<N>-:
#               its own Unix accounts, homes, groups, group folders and cgroups), and the modules that use Slurm's
#               one node one after the other on one worker (tests/conftest.py); LIVE_WORKERS=1: one process
# The fast group's output follows the live group's; the target fails if either group failed.
FAST_TESTS ?= tests/unit tests/chart tests/k8s
LIVE_TESTS ?= tests/integration tests/browser
LIVE_WORKERS ?= 2
PARALLEL ?= 1
LIVE_XDIST = $(if $(filter-out 0 1,$(LIVE_WORKERS)),-n $(LIVE_WORKERS) --dist loadgroup,)

test: install slurm postgres browser lint
	@$(MAKE) --no-print-directory test-groups

.PHONY: test-groups
test-groups:  # the test run of `make test`, without installing or starting anything first
ifeq ($(PARALLEL),0)
	$(VENV)/bin/python -m pytest -ra --durations=25 $(PYTEST_ARGS) tests
else
	@mkdir -p .workbench; fastlog=.workbench/test-fast.log; \
	nice -n 5 $(VENV)/bin/python -m pytest -ra --durations=10 $(PYTEST_ARGS) $(FAST_TESTS) >$$fastlog 2>&1 & fast=$$!; \
	trap 'kill $$fast 2>/dev/null' INT TERM; \
	echo "[make test] $(FAST_TESTS) running beside these (output below when both are done: $$fastlog)"; \
	$(VENV)/bin/python -m pytest -ra --durations=25 $(LIVE_XDIST) $(PYTEST_ARGS) $(LIVE_TESTS); live=$$?; \
	wait $$fast; fastrc=$$?; \
	echo "================ [make test] $(FAST_TESTS), run beside the above: exit $$fastrc ================"; \
	cat $$fastlog; \
	echo "[make test] exit codes: $(LIVE_TESTS) $$live, $(FAST_TESTS) $$fastrc"; \
	ok() { [ "$$1" -eq 0 ] || [ "$$1" -eq 5 ]; }; \
	ok $$live && ok $$fastrc && ! [ "$$live" -eq 5 -a "$$fastrc" -eq 5 ]
endif

.PHONY: slurm
slurm:  # a real one-node Slurm for the Slurm backend's tests and `workbench up --gateway-backend slurm`
	@scripts/slurm-up.sh

.PHONY: browser
browser:  # Debian's chromium and chromedriver for the browser tests (tests/browser: JupyterLab notifications)
	@scripts/system-deps.sh --browser

.PHONY: postgres
postgres:  # a local PostgreSQL (Debian's packages) for the quota ledger's tests (they ask the script for its URL)
	@scripts/postgres-up.sh >/dev/null

lint: install  # ruff: lint, import order and format (configured in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

unit: install
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS) tests/unit

bench: install
	$(VENV)/bin/python benchmarks/bench_embedded.py
	$(VENV)/bin/python benchmarks/bench_slurm_spawn.py  # supercomputer mode vs stock batchspawner (root + make slurm; else skipped)

check: install
	$(VENV)/bin/workbench check hub_config/demo.yaml

# The lock of the Python packages make install uses (pip constraints): refresh it, then run make test and commit
.PHONY: lock
lock:
	@test -x $(VENV)/bin/python || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -qq --upgrade -e '.[test]'
	@{ head -2 requirements-lock.txt; $(VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^workbench'; } > requirements-lock.txt.new
	@mv requirements-lock.txt.new requirements-lock.txt
	@echo "[workbench] requirements-lock.txt refreshed: run make test, then commit it"

clean:
	rm -rf $(VENV) .workbench .pytest_cache

# Kubernetes: the Helm chart (charts/workbench) and the images (images/)
.PHONY: chart values-schema images-lock
chart: install  # helm lint/template + Kubernetes schemas + security checks, hadolint, image locks (fetches helm once)
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS) tests/chart

values-schema: install  # regenerate charts/workbench/values.schema.json from the policy model (workbench.policy.Policy)
	$(VENV)/bin/python scripts/gen-values-schema.py

images-lock: install  # re-lock images/*/requirements.txt from their requirements.in (Python 3.11, linux x86_64)
	PYTHON=$(VENV)/bin/python images/lock-requirements.sh

# Notifications in JupyterLab: the prebuilt extension is committed in $(LAB_EXTENSION_OUT); rebuild it after
# editing $(LAB_EXTENSION)/src (npm, @jupyterlab/builder, against the JupyterLab installed in $(VENV))
.PHONY: lab-extension
lab-extension: install
	cd $(LAB_EXTENSION) && npm ci --no-audit --no-fund --loglevel=error
	cd $(LAB_EXTENSION) && rm -rf lib tsconfig.tsbuildinfo && PATH="$(abspath $(VENV))/bin:$$PATH" npm run build

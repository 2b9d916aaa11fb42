# Set-up and entry points. `make test` and `make demo` create .venv when it is missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: venv system-deps test lint unit integration demo bench-venv bench-curate clean

$(BIN)/mmray: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the pinned CPU wheel comes from local disk; a bare `torch` would pull CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/mmray

# Servers the tests start for real, from Debian's packages, installed when missing (as root;
# otherwise install them yourself): Chromium for the page test (Playwright drives it and
# downloads no browser) and PostgreSQL for the MLflow server test.
system-deps:
	@test -x /usr/bin/chromium -a -x /usr/lib/postgresql/15/bin/postgres || { \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		--no-install-recommends chromium postgresql-15; }

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

unit: venv
	$(BIN)/pytest -q tests/unit

integration: venv system-deps
	$(BIN)/pytest -q tests/integration

test: venv system-deps lint
	$(BIN)/pytest -q tests

# Every stage as a Ray job on a local two-node cluster, with an MLflow server; the services
# keep running until `.venv/bin/mmray demo --stop`.
demo: venv
	$(BIN)/mmray demo

# img2dataset in its own virtualenv: its pins (webdataset<0.3, pandas<3) clash with ours.
.venv-img2dataset/bin/img2dataset:
	$(PY) -m venv .venv-img2dataset
	.venv-img2dataset/bin/pip install -q img2dataset==1.47.0

bench-venv: .venv-img2dataset/bin/img2dataset

bench-curate: venv bench-venv
	$(BIN)/python -m bench.curate

clean:
	rm -rf .demo mlruns mlflow.db .pytest_cache

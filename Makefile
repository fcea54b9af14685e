# One entry point for people and CI. `make test` works on a fresh clone: it makes the virtualenv,
# installs the project and its test tools, installs redis-server if the machine lacks it, and runs
# the whole suite (real-Redis tests included).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all test lint format bench demo setup system-deps clean

all: lint test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,fast]'
	touch $(STAMP)

setup: $(STAMP) system-deps

# Debian packages the tests drive for real (a redis-server of their own).
system-deps:
	@./.ci/system-deps

test: setup
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check sidecar tests bench
	$(BIN)/ruff format --check sidecar tests bench
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

format: $(STAMP)
	$(BIN)/ruff format sidecar tests bench
	$(BIN)/ruff check --fix sidecar tests bench

# Every benchmark, side by side on this machine; writes BENCHMARKS.md (a few minutes).
bench: setup
	$(BIN)/python -m bench.run

# The quick start: needs no Redis (embedded store) and no system packages.
demo: $(STAMP)
	$(BIN)/admission-sidecar demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

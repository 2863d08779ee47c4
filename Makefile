# Two commands do all the set-up (README, "Install"):
#   make quickstart   a virtual environment in .venv with fedprompt, then the offline quickstart
#   make test         the same environment plus the test tools, then ruff and the whole suite
#   make mutation     mutation testing of the safety code, with its score per module (long)
# Each installs only what changed since the last time (the stamps in .venv say what was done).

VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.fedprompt-installed
TEST_INSTALLED := $(VENV)/.fedprompt-test-installed
MUTATION_INSTALLED := $(VENV)/.fedprompt-mutation-installed

# Recipes find pip, python, fedprompt and ruff in the environment first.
export PATH := $(abspath $(BIN)):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: quickstart test mutation

quickstart: $(INSTALLED)
	fedprompt simulate quickstart

test: $(TEST_INSTALLED)
	ruff check .
	python -m pytest

$(BIN)/python:
	python3 -m venv $(VENV)

# The torch pair first: these two versions are known to work together.
$(INSTALLED): pyproject.toml | $(BIN)/python
	pip install torch==2.14.1 torchvision==0.29.1
	pip install -e .
	touch $@

$(TEST_INSTALLED): $(INSTALLED)
	pip install -e ".[test]"
	touch $@

# mutmut copies the project into mutants/ and runs the tests there, so the data beside the project
# (../shared) must also be found from mutants/: hence the ignored link shared -> ../shared.
mutation: $(MUTATION_INSTALLED)
	test -e shared || ! test -e ../shared || ln -s ../shared shared
	mutmut run
	python tests/mutation_score.py

$(MUTATION_INSTALLED): $(TEST_INSTALLED)
	pip install -e ".[test,mutation]"
	touch $@

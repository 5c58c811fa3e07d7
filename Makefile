# The two commands: `make bench` (the default sweep and its report) and `make test`.
# Both create and reuse the virtual environment in $(VENV); see scripts/setup_env.sh.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: bench test lint setup clean-venv

bench: $(VENV)/.installed
	$(PY) -m harness $(ARGS)

test: $(VENV)/.installed lint
	$(PY) -m pytest -q $(ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $@

clean-venv:
	rm -rf $(VENV)

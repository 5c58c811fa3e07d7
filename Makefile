# The two commands: `make bench` (the default sweep and its report) and `make test`.
# Both create and reuse the virtual environment in $(VENV); see scripts/setup_env.sh.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
BASELINE ?= results/regress-baseline
CHECK_DIR ?= build/regress

.PHONY: bench test regress lint setup clean-venv

bench: $(VENV)/.installed
	$(PY) -m harness $(ARGS)

test: $(VENV)/.installed lint
	$(PY) -m pytest -q $(ARGS)

# CI's regression check: a `ci` sweep of this checkout against the committed baseline (exit 1 on
# a regression; see harness/compare.py and README "Regression check").
regress: $(VENV)/.installed
	rm -rf $(CHECK_DIR)/regress-check
	$(PY) -m harness sweep=regress run_id=regress-check results_dir=$(CHECK_DIR) report=false
	$(PY) -m harness.compare $(BASELINE) $(CHECK_DIR)/regress-check --allow-env-mismatch=model

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $@

clean-venv:
	rm -rf $(VENV)

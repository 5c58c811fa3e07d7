#!/usr/bin/env bash
# Does harness.compare flag what it should and nothing else? The scenario matrix of fresh
# `regress` sweeps against a baseline (A/A, slowdowns of one variant, of one pass, of the causal
# cells, of the dense family, variants added, one removed): see scripts/check_compare.py.
#   bash scripts/check_compare.sh [BASELINE] [--runs N] [--scenarios a,b] [--variant V] [-- ARGS]
# Writes results/compare-check/summary.{csv,md}; exit 1 if a scenario misses its want.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PY:-.venv/bin/python}" scripts/check_compare.py "$@"

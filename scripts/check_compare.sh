#!/usr/bin/env bash
# Does harness.compare flag what it should and nothing else? N A/A comparisons (a fresh `regress`
# sweep of this checkout against BASELINE) and N comparisons of a sweep in which VARIANT's timed
# calls are made FACTOR times slower by a busy wait (inject_slowdown), each against BASELINE.
#   bash scripts/check_compare.sh [BASELINE] [N] [VARIANT] [FACTOR]
# Writes build/compare-check/summary.txt; exit 1 if an A/A run is flagged or a slowdown missed.
set -uo pipefail
cd "$(dirname "$0")/.."
BASELINE=${1:-results/regress-baseline}
N=${2:-10}
VARIANT=${3:-local}
FACTOR=${4:-1.5}
PY=${PY:-.venv/bin/python}
OUT=build/compare-check
rm -rf "$OUT" && mkdir -p "$OUT"

one() {  # one() NAME [overrides...]: sweep, compare, print the compare's exit status
  local name=$1
  shift
  "$PY" -m harness sweep=regress run_id="$name" results_dir="$OUT" report=false "$@" \
    >"$OUT/$name.sweep.log" 2>&1 || { echo "sweep $name failed" >&2; echo 2; return; }
  "$PY" -m harness.compare "$BASELINE" "$OUT/$name" >"$OUT/$name.compare.txt" 2>&1
  echo $?
}

for i in $(seq 1 "$N"); do
  rc=$(one "aa-$i")
  echo "A/A $i: compare exit $rc"
  rc=$(one "slow-$i" "+inject_slowdown.$VARIANT=$FACTOR")
  echo "slowdown $i: compare exit $rc"
done | tee "$OUT/log.txt"
aa_flagged=$(grep -c "^A/A .*exit 1$" "$OUT/log.txt")
slow_flagged=$(grep -c "^slowdown .*exit 1$" "$OUT/log.txt")
{
  echo "baseline: $BASELINE"
  echo "A/A: $aa_flagged of $N flagged (want 0)"
  echo "$VARIANT slowed ${FACTOR}x: $slow_flagged of $N flagged (want $N)"
} | tee "$OUT/summary.txt"
[ "$aa_flagged" = 0 ] && [ "$slow_flagged" = "$N" ]

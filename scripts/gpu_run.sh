#!/usr/bin/env bash
# The GPU run. On a machine with one CUDA GPU, this repository and the wheels in .whl/: install
# what does not import, measure the `gpu` sweep (every variant and baseline: SDPA backends incl.
# flash and cuDNN, xformers, FlexAttention twins; bfloat16; fwd and fwd_bwd; n up to 32768),
# train one accuracy task on its `gpu` preset (training time-capped), render the report and print
# a summary, all inside 6 minutes on an H200 (each stage has a time limit; a stage stopped at its
# limit keeps every row it finished).
#
#   bash scripts/gpu_run.sh             # -> results/gpu-<date>/{speed,<task>}/, reports/gpu-<date>/
#   bash scripts/gpu_run.sh --dry-run   # (or DRY_RUN=1) the same stages on this CPU, tiny grid,
#                                       # nothing installed, into $GPU_RUN_OUT (default: a temp dir)
#
# Environment: BUDGET_S (seconds for everything: 345; dry run 180), TASK (mqar), ACC_VARIANTS
# (full,local,linear; dry run full,local), FLEX_SEQ_LENS (32768: each length compiles every twin
# again, ~8 s a graph), NAME (gpu-<date>), PYTHON, GPU_RUN_SITE (where missing wheels go).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY_RUN=${DRY_RUN:-0}
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,15p' "$0" | cut -c3-; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

STARTED=$(date +%s)
STAMP=$(date -u +%Y%m%d-%H%M)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
TASK=${TASK:-mqar}
HELPER=(scripts/gpu_run.py)

if [[ $DRY_RUN == 1 ]]; then
  NAME=${NAME:-dry-$STAMP}
  OUT=${GPU_RUN_OUT:-${TMPDIR:-/tmp}/attnbench-gpu-dry-run}
  RESULTS=$OUT/results/$NAME
  REPORTS=$OUT/reports
  # About a minute; the limits leave room for a busy shared CI machine.
  BUDGET_S=${BUDGET_S:-180}
  SPEED_MAX=100 ACC_MIN=30 ACC_MAX=60 ACC_RESERVE=40 REPORT_MIN=30
  ACC_VARIANTS=${ACC_VARIANTS:-full,local}
  # The gpu preset with the CPU and a tiny grid; the twins run eagerly (compile=false): the same
  # cells and code paths without ~20 s of CPU compile per graph.
  SPEED=(sweep=gpu device=cpu sweep.dtypes=[float32] sweep.seq_lens=[64,128] sweep.num_heads=[2]
    sweep.head_dims=[16] sweep.min_run_time=0.005 sweep.min_blocks=2 device.matmul_size=128
    sweep.timeout_s=60 'sweep.exclude=[flex_*]'
    "sweep.extra=[{variant: sparse, options: {pattern: bigbird, block_size: 16}},$(
    ) {variant: \"flex_*\", seq_lens: [64], options: {compile: false}}]")
  ACC=(task=$TASK preset=ci sweep=gpu device=cpu "sweep.variants=[$ACC_VARIANTS]" "sweep.extra=[]")
  REPORT_OPTS=(--no-patterns)
else
  NAME=${NAME:-gpu-$STAMP}
  RESULTS=results/$NAME
  REPORTS=reports
  BUDGET_S=${BUDGET_S:-345}
  # estimated on an H200: speed ~120 s plus ~25 s per flex twin and length, mqar data ~20 s
  SPEED_MAX=240 ACC_MIN=40 ACC_MAX=90 ACC_RESERVE=15 REPORT_MIN=45
  ACC_VARIANTS=${ACC_VARIANTS:-full,local,linear}
  FLEX_SEQ_LENS=${FLEX_SEQ_LENS:-32768}
  # The twins at FLEX_SEQ_LENS only: 4 twins x (fwd, fwd_bwd) = 8 compiled graphs per length,
  # which is torch._dynamo's default recompile limit for one process (the sweep's worker): with
  # more lengths, the graphs past the 8th are not compiled and those twins run eagerly.
  SPEED=(sweep=gpu sweep.timeout_s=60 'sweep.exclude=[flex_*]'
    "sweep.extra=[{variant: sparse, options: {pattern: bigbird}},$(
    ) {variant: \"flex_*\", seq_lens: [$FLEX_SEQ_LENS]}]")
  ACC=(task=$TASK preset=gpu sweep=gpu "sweep.variants=[$ACC_VARIANTS]" "sweep.extra=[]")
  REPORT_OPTS=()
fi
LOGS=$RESULTS/logs
mkdir -p "$LOGS"
STAGES=()

elapsed() { echo $(($(date +%s) - STARTED)); }
# The seconds a stage may take: at most $1, leaving $2 for the stages after it, at least $3.
limit() {
  local left=$((STARTED + BUDGET_S - $(date +%s) - $2))
  ((left > $1)) && left=$1
  ((left < $3)) && left=$3
  echo "$left"
}
# stage NAME SECONDS CMD...: run CMD under a time limit (SIGINT, then SIGKILL 20 s later), its
# output in $LOGS/NAME.log; the tail of the log is shown when it fails.
stage() {
  local name=$1 secs=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo "[$(elapsed) s] $name: up to $secs s"
  timeout --signal=INT --kill-after=20 "$secs" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  echo "[$(elapsed) s] $name: exit $rc after $(($(date +%s) - t0)) s (log: $LOGS/$name.log)"
  if ((rc != 0)); then tr '\r' '\n' <"$LOGS/$name.log" | grep -v '^\s*$' | tail -n 12 | sed 's/^/    /'; fi
  STAGES+=("$name=$rc")
  return 0
}

echo "attnbench GPU run $NAME$([[ $DRY_RUN == 1 ]] && echo ' (dry run: CPU, tiny grid)'); budget $BUDGET_S s"
echo "results: $RESULTS  report: $REPORTS/$NAME"

# --- 1. what is missing -------------------------------------------------------------------------
want=$("$PYTHON" "${HELPER[@]}" missing) || exit 4
if [[ -n $want ]]; then
  mapfile -t wheels <<<"$want"
  if [[ $DRY_RUN == 1 ]]; then
    echo "dry run: would install ${wheels[*]}"
  else
    SITE=${GPU_RUN_SITE:-${TMPDIR:-/tmp}/attnbench-site}
    rm -rf "$SITE"
    echo "[$(elapsed) s] installing into $SITE: ${wheels[*]}"
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
      "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" \
        "${wheels[@]}" || { echo "pip install failed" >&2; exit 4; }
    else # no pip: a wheel is a zip of the files to put on sys.path (none of these runs a hook)
      for wheel in "${wheels[@]}"; do "$PYTHON" -m zipfile -e "$wheel" "$SITE" || exit 4; done
    fi
    export PYTHONPATH=$SITE:$PYTHONPATH
    "$PYTHON" "${HELPER[@]}" missing --after-install || exit 4
  fi
fi
if [[ $DRY_RUN != 1 ]]; then
  "$PYTHON" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if ok else 'NO CUDA GPU'); sys.exit(0 if ok else 3)" ||
    { echo "no CUDA GPU here: run with --dry-run to check the script on CPU" >&2; exit 3; }
fi

# --- 2. speed, 3. accuracy, 4. report -----------------------------------------------------------
stage speed "$(limit $SPEED_MAX $((ACC_MIN + REPORT_MIN)) 30)" \
  "$PYTHON" "${HELPER[@]}" harness "${SPEED[@]}" results_dir="$RESULTS" run_id=speed report=false
acc_s=$(limit $ACC_MAX $REPORT_MIN 20)
stage "$TASK" "$acc_s" \
  "$PYTHON" "${HELPER[@]}" task --budget-s "$((acc_s - 10))" --reserve-s $ACC_RESERVE "${ACC[@]}" \
  results_dir="$RESULTS" run_id="$TASK" report=false
stage report "$(limit 300 0 $REPORT_MIN)" \
  "$PYTHON" -m harness.report "$RESULTS" --name "$NAME" --out "$REPORTS" "${REPORT_OPTS[@]}"

# --- 5. summary ---------------------------------------------------------------------------------
page=$REPORTS/$NAME/index.html
[[ -f $page ]] || page=""
"$PYTHON" "${HELPER[@]}" summary "$RESULTS" --report "$page" --started "$STARTED" --budget-s "$BUDGET_S"
echo "stages (exit codes): ${STAGES[*]}; $(elapsed) s in all"
for s in "${STAGES[@]}"; do [[ ${s#*=} == 0 ]] || exit 1; done
[[ -n $page ]] || exit 1
exit 0

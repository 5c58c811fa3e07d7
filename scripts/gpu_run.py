"""Helpers of scripts/gpu_run.sh: what to install, the time-capped accuracy task, the summary.

    python scripts/gpu_run.py missing                  # wheels to install, one a line
    python scripts/gpu_run.py harness sweep=gpu ...    # python -m harness, stoppable by SIGINT
    python scripts/gpu_run.py task --budget-s 80 task=mqar preset=gpu sweep=gpu ...
    python scripts/gpu_run.py summary RESULTS_DIR --report PAGE --started EPOCH --budget-s 360

Run from the repository root with it on PYTHONPATH (the shell script does both).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import runpy
import signal
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# module to import -> the wheel in .whl/ that provides it, and whether the run needs it.
WHEELS = {
    "yaml": ("[Pp]y[Yy][Aa][Mm][Ll]-*.whl", True),  # omegaconf's; most Pythons have it
    "packaging": ("packaging-*.whl", True),  # hydra's; matplotlib's too
    "antlr4": ("antlr4_python3_runtime-*.whl", True),
    "omegaconf": ("omegaconf-*.whl", True),
    "hydra": ("hydra_core-*.whl", True),
    "xformers": ("xformers-*.whl", False),  # without it: `unsupported` rows, with the reason
}


# --- missing ----------------------------------------------------------------------------------
def importable(module: str) -> bool:
    """Whether ``module`` imports (its warnings, such as xformers' about its kernels, are the
    harness's to report as row reasons, not this check's)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(module)
    except Exception:  # an ImportError, or a broken install failing at import
        return False
    return True


def cmd_missing(args) -> int:
    """Print the wheels to install for what does not import, one path a line; exit 1 when a
    module the run needs neither imports nor has a wheel (or, after the install, still does
    not import)."""
    fatal = []
    for module, (glob, needed) in WHEELS.items():
        if importable(module):
            continue
        wheels = sorted(args.wheels.glob(glob))
        if args.after_install or not wheels:
            why = f"no {glob} in {args.wheels}"
            if args.after_install:
                why = "after installing its wheel"
            print(f"{module} does not import ({why})", file=sys.stderr)
            if needed:
                fatal.append(module)
            continue
        print(wheels[-1])
    if fatal:
        print(f"cannot run without: {', '.join(fatal)}", file=sys.stderr)
        return 1
    return 0


# --- the sweep ----------------------------------------------------------------------------------
def stoppable() -> None:
    """Ctrl-C semantics for SIGINT even where the shell started us with SIGINT ignored (a
    background job): the shell's time limit sends SIGINT, and the harness then stops its worker,
    marks the run interrupted and keeps every finished row."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def cmd_harness(args) -> int:
    stoppable()
    sys.argv = ["harness", *args.overrides]
    try:
        runpy.run_module("harness", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


# --- the time-capped accuracy task ------------------------------------------------------------
def cmd_task(args) -> int:
    """``python -m harness task=... preset=...`` in this process, with each variant's training
    capped so that the whole task fits ``--budget-s``. The data are generated first (once; every
    variant shares them), then what is left is split between the variants; the cap and what it
    changed are written into the run's meta.json."""
    from hydra import compose, initialize_config_dir

    import harness.config as hconfig
    from harness import results, sweep

    stoppable()
    started = time.perf_counter()
    with initialize_config_dir(config_dir=str(hconfig.CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=args.overrides)
    capped = None
    try:
        capped = cap_training(cfg, args.budget_s, started, args.reserve_s)
        sweep.run(cfg)
    except sweep.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the shell's time limit: finished variants are saved
        print(f"accuracy: interrupted at the time limit; rows so far: {cfg.results_dir}")
        return 130
    finally:
        run_dir = Path(cfg.results_dir) / str(cfg.resume or cfg.run_id)
        if capped and (run_dir / "meta.json").is_file():
            meta = results.read_meta(run_dir)
            meta["time_capped"] = capped
            results.write_meta(run_dir, meta)
    return 0


def cap_training(cfg, budget_s: float, started: float, reserve_s: float) -> dict | None:
    """Cap the task's training time so that every variant and seed fits the budget; returns
    what changed (recorded in meta.json)."""
    from harness.validate import check

    jobs = len(check(cfg).entries) * len(cfg.sweep.seeds)  # refuses bad input, as run() does
    spent = time.perf_counter() - started
    cap = max(5.0, (budget_s - spent - reserve_s) / jobs)
    train = cfg.task.train
    eval_every = min(train.eval_every, 100)  # the cap is checked at validations only
    capped = {
        "max_train_s": round(cap, 1),
        "eval_every": eval_every,
        "preset_eval_every": train.eval_every,
        "budget_s": budget_s,
    }
    train.max_train_s, train.eval_every = cap, eval_every
    print(f"accuracy: training capped at {cap:.0f} s per variant and seed")
    return capped


# --- the summary ------------------------------------------------------------------------------
def cmd_summary(args) -> int:
    from harness.results import load

    runs, rows = load([args.results])
    wall = time.time() - args.started if args.started else None
    print()
    print(f"== attnbench GPU run: {args.results}" + (f" ({wall:.0f} s" if wall else ""), end="")
    print(f" of a {args.budget_s:.0f} s budget) ==" if wall else " ==")
    for run in runs:
        counts = run.rows["status"].value_counts().to_dict() if not run.rows.empty else {}
        text = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no rows"
        gpu = run.meta.get("gpu") or run.meta.get("device", "")
        why = f": {run.reason}" if run.status in ("failed", "interrupted") else ""
        print(f"run {run.name} on {gpu}: {run.status}{why} ({text})")
        peaks = run.meta.get("matmul_peak_gflops")
        if isinstance(peaks, dict) and all(isinstance(v, int | float) for v in peaks.values()):
            text = ", ".join(f"{d} {v / 1000:.1f} TFLOP/s" for d, v in peaks.items())
            print(f"  matmul peak: {text}")
        capped = run.meta.get("time_capped")
        if capped:
            print(f"  accuracy training capped at {capped['max_train_s']} s per variant")
    speed_table(rows[rows["kind"] == "speed"])
    accuracy_table(rows[rows["kind"] == "accuracy"])
    if args.report:
        print(f"report: {args.report}")
    return 0 if any(r.status in ("ok", "partial", "interrupted") for r in runs) else 1


def short_labels(rows):
    """A variant measured with several option sets, named by the options that differ only
    (``sparse[pattern=bigbird]`` rather than every option)."""
    parsed = rows["options"].map(lambda t: json.loads(t) if t.startswith("{") else {})
    labels = rows["variant"].copy()
    for name in rows["variant"].unique():
        mine = parsed[rows["variant"] == name]
        keys = sorted({k for o in mine for k in o})
        differ = [k for k in keys if len({json.dumps(o.get(k)) for o in mine}) > 1]
        if differ:
            labels[mine.index] = [
                f"{name}[{','.join(f'{k}={o.get(k)}' for k in differ)}]" for o in mine
            ]
    return labels


def speed_table(speed) -> None:
    if speed.empty:
        print("speed: no rows")
        return
    speed = speed.assign(label=short_labels(speed))
    n = int(speed["seq_len"].max())
    at_n = speed[speed["seq_len"] == n]
    ok = at_n[at_n["status"] == "ok"]
    print(f"at n={n} ({', '.join(sorted(set(at_n['dtype'])))}), fastest forward first:")
    columns = {"latency_ms": "{} ms", "peak_mem_mb": "{} MB", "compile_s": "{} compile s"}
    table = ok.pivot_table(index="label", columns="pass", values=list(columns), aggfunc="min")
    if not table.empty:
        table.columns = [columns[value].format(pass_) for value, pass_ in table.columns]
        table = table.dropna(axis=1, how="all").sort_values(table.columns[0])
        print(table.to_string(float_format=lambda x: f"{x:.4g}", na_rep="-"))
    others = at_n[at_n["status"] != "ok"].drop_duplicates(["label", "status"])
    for row in others.itertuples():
        print(f"  {row.label}: {row.status}: {str(row.reason)[:110]}")


def accuracy_table(acc) -> None:
    if acc.empty:
        return
    print("accuracy (test, best validation checkpoint):")
    for row in acc.itertuples():
        if row.status == "ok":
            print(f"  {row.task} {row.label}: {row.accuracy:.3f} ({row.steps:.0f} steps, ", end="")
            print(f"{row.train_s:.0f} s)")
        else:
            print(f"  {row.task} {row.label}: {row.status}: {str(row.reason)[:100]}")


# --- the command line -------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_run.py", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("missing", help="wheels to install, one a line")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl", help="where the wheels are")
    p.add_argument("--after-install", action="store_true", help="check only, list nothing")
    p = sub.add_parser("harness", help="python -m harness OVERRIDES, stoppable by SIGINT")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="harness overrides")
    p = sub.add_parser("task", help="the accuracy task, training time-capped")
    p.add_argument("--budget-s", type=float, required=True, help="for the whole task")
    p.add_argument("--reserve-s", type=float, default=15.0, help="left for approximation rows")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="harness overrides")
    p = sub.add_parser("summary", help="print what the run measured")
    p.add_argument("results", type=Path)
    p.add_argument("--report", default="")
    p.add_argument("--started", type=float, default=0.0, help="the script's start (epoch s)")
    p.add_argument("--budget-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    commands = {
        "missing": cmd_missing,
        "harness": cmd_harness,
        "task": cmd_task,
        "summary": cmd_summary,
    }
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

"""Does ``harness.compare`` flag what it should and nothing else, on this machine?

A scenario matrix of fresh ``regress`` sweeps of this checkout, each compared against BASELINE
the way CI compares (``make regress``), each scenario repeated ``--runs`` times, interleaved so
that a slow hour of the machine falls on every scenario alike:

    aa            the same checkout again                       want 0 of N flagged
    slow-all      VARIANT 1.5x in every cell                    want >= 90% caught
    slow-fwd_bwd  VARIANT 1.6x in its fwd_bwd cells only        want >= 90% caught
    slow-causal   VARIANT 1.6x in its causal cells only         want >= 90% caught
    dense         full, sdpa, sdpa_math, relative 1.3x together want >= 90% caught
    added         three option sets only in the new run         want 0 of N flagged
    removed       sparse not swept (sweep.exclude)              want N of N missing, nothing else

Slowdowns are injected by ``+inject_slowdown`` (a busy wait after each timed call). Writes
``results/compare-check/summary.csv`` and ``.md`` (scenario, runs, flagged, the median change
of what was injected, the largest change elsewhere, what else was flagged) and ``runs.csv``
(one line per comparison); sweeps and compare reports stay in ``build/compare-check/``.

    .venv/bin/python scripts/check_compare.py [BASELINE] [--runs 10] [--scenarios aa,dense]
        [--variant local] [--make-baseline] [--reuse] [-- COMPARE ARGS...]

Each sweep takes about a minute of both cores on a quiet machine (70 for the whole matrix at
N=10, plus 3 for a baseline of 9 rounds with --make-baseline). Exit 0 when every scenario meets
its want.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import compare  # noqa: E402  (the checkout's own, not an installed one)
from harness.results import cpu_model, git_commit, read_run  # noqa: E402

DENSE = ("full", "sdpa", "sdpa_math", "relative")  # one dense code path (DenseAttention)
EXTRA = "[{variant:sparse,options:{pattern:bigbird}},{variant:sparse,options:{pattern:strided}},{variant:linear,options:{feature_map:favor}}]"  # noqa: E501
REMOVED = "sparse"
CATCH = 0.9  # share of the runs an injected slowdown must be caught in
# The baseline's noise is in every comparison made against it: 9 rounds (about 3 minutes, once)
# make a slow spell that hits most rounds of one of its cells unlikely, which 3 do not.
BASELINE_ROUNDS = 9


@dataclass
class Scenario:
    name: str
    injected: str  # in words, for the table
    overrides: list[str]
    targets: list[tuple[str, str]]  # (variant, group) where it must be flagged; [] none
    want: str  # "pass": never flagged; "catch": caught in CATCH of the runs; "missing"


def scenarios(variant: str) -> dict[str, Scenario]:
    exclude = [*OmegaConf.load(REPO / "conf/sweep/regress.yaml").exclude, REMOVED]
    family = ",".join(f"{v}:1.3" for v in DENSE)
    found = [
        Scenario("aa", "nothing", [], [], "pass"),
        Scenario("slow-all", f"{variant} 1.5x, every cell",
                 [f"+inject_slowdown={{{variant}:1.5}}"], [(variant, "all")], "catch"),
        Scenario("slow-fwd_bwd", f"{variant} 1.6x, fwd_bwd cells",
                 [f"+inject_slowdown={{{variant}@fwd_bwd:1.6}}"], [(variant, "fwd_bwd")], "catch"),
        Scenario("slow-causal", f"{variant} 1.6x, causal cells",
                 [f"+inject_slowdown={{{variant}@causal:1.6}}"], [(variant, "causal")], "catch"),
        Scenario("dense", "full, sdpa, sdpa_math, relative 1.3x",
                 [f"+inject_slowdown={{{family}}}"], [(v, "all") for v in DENSE], "catch"),
        Scenario("added", "sparse bigbird, sparse strided, linear favor added",
                 [f"sweep.extra={EXTRA}"], [], "pass"),
        Scenario("removed", f"{REMOVED} not swept",
                 [f"sweep.exclude=[{','.join(exclude)}]"], [(REMOVED, "all")], "missing"),
    ]  # fmt: skip
    return {s.name: s for s in found}


# --- sweeps ---------------------------------------------------------------------------------------
def sweep(run_dir: Path, overrides: list[str], reuse: bool, python: str) -> str:
    """Measure one ``regress`` run into run_dir; "" when it finished, else why not."""
    if reuse and run_dir.is_dir() and read_run(run_dir).finished:
        return ""
    shutil.rmtree(run_dir, ignore_errors=True)  # a run_id that holds results is refused
    command = [python, "-m", "harness", "sweep=regress", f"run_id={run_dir.name}",
               f"results_dir={run_dir.parent}", "report=false", *overrides]  # fmt: skip
    log = run_dir.parent / f"{run_dir.name}.sweep.log"
    started = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    print(f"  swept {run_dir.name} in {time.monotonic() - started:.0f} s", flush=True)
    return "" if code == 0 else f"sweep exited {code} (see {log})"


# --- one comparison -------------------------------------------------------------------------------
def run_line(scenario: Scenario, run_dir: Path, **values) -> dict:
    """One line of runs.csv; a sweep that failed keeps the defaults (not compared)."""
    commit = read_run(run_dir).meta.get("git_commit", "") if run_dir.is_dir() else ""
    line = {"scenario": scenario.name, "run": run_dir.name, "commit": commit, "exit": 2,
            "caught": False, "target change": np.nan, "largest change elsewhere": np.nan,
            "flagged": "", "also flagged": "", "new": "", "why not compared": ""}  # fmt: skip
    return line | values


def judge(scenario: Scenario, baseline: Path, run_dir: Path, compare_args: list[str]) -> dict:
    """Compare's exit status and what it flagged, against the scenario's want."""
    outcome = compare.run([str(baseline), str(run_dir), *compare_args])
    (run_dir.parent / f"{run_dir.name}.compare.txt").write_text(outcome.text + "\n")
    res = outcome.comparison
    flagged = res.flagged if res else []
    names = {v for v, _ in scenario.targets}
    hit = [f for f in flagged if f[0] in names]
    return run_line(
        scenario,
        run_dir,
        exit=outcome.code,
        caught=_caught(scenario, outcome.code, hit),
        **{
            "target change": _target_change(res, scenario.targets),
            "largest change elsewhere": _largest_elsewhere(res, names),
            "flagged": _compact(hit),
            "also flagged": _compact([f for f in flagged if f[0] not in names]),
            "new": len(res.new) if res else "",
            "why not compared": outcome.text if outcome.code == 2 else "",
        },
    )


def _compact(flagged: list[tuple[str, str]]) -> str:
    """``local fwd_bwd, 2 cells; full 6 exact``: groups by name, lone cells and exact metrics
    counted (their lines are in the compare report beside the sweep)."""
    kinds: dict[str, dict[str, int]] = {}
    for variant, group in flagged:
        kind = group.split()[0] if group.startswith(("cell ", "exact ")) else group
        kinds.setdefault(variant, {}).setdefault(kind, 0)
        kinds[variant][kind] += 1
    words = lambda k, n: (
        k if k not in ("cell", "exact") else f"{n} {k}{'s' * (n > 1 and k == 'cell')}"
    )
    return "; ".join(
        f"{v} " + ", ".join(words(k, n) for k, n in ks.items()) for v, ks in kinds.items()
    )


def _caught(scenario: Scenario, code: int, hit: list) -> bool:
    """Flagged the way the scenario is about: anything at all for pass, its target otherwise."""
    if scenario.want == "pass":
        return code != 0
    if scenario.want == "missing":
        return code == 1 and set(scenario.targets) <= set(hit)
    return code == 1 and bool(hit)


def _target_change(res, targets) -> float:
    """Median change of the injected (variant, group)s: what the check saw of the slowdown."""
    if res is None or not targets:
        return np.nan
    g = res.groups.set_index(["variant", "group"])
    changes = [g.at[t, "change"] for t in targets if t in g.index]
    return float(np.median(changes)) if changes else np.nan


def _largest_elsewhere(res, names) -> float:
    """The largest group change of a variant nothing was injected into: the margin of noise."""
    if res is None:
        return np.nan
    others = res.groups[~res.groups["variant"].isin(names)]
    return float(others["change"].max()) if not others.empty else np.nan


# --- the table ------------------------------------------------------------------------------------
def summary(rows: list[dict], matrix: dict[str, Scenario]) -> list[dict]:
    out = []
    for name, scenario in matrix.items():
        mine = [r for r in rows if r["scenario"] == name]
        if not mine:
            continue
        caught = sum(r["caught"] for r in mine)
        also = Counter(a.split()[0] for r in mine for a in r["also flagged"].split("; ") if a)
        out.append(
            {
                "scenario": name,
                "injected": scenario.injected,
                "runs": len(mine),
                "flagged": caught,
                "want": _want(scenario, len(mine)),
                "met": _met(scenario, caught, len(mine), mine),
                "median change": _median(r["target change"] for r in mine),
                "largest change elsewhere (median, max)": _spread(mine),
                "not compared": sum(r["exit"] == 2 for r in mine),
                "also flagged (runs)": "; ".join(f"{v} ({n})" for v, n in sorted(also.items())),
            }
        )
    return out


def _want(scenario: Scenario, runs: int) -> str:
    if scenario.want == "pass":
        return "0"
    if scenario.want == "missing":
        return f"{runs}, nothing else"
    return f">= {int(np.ceil(CATCH * runs))}, nothing else"


def _met(scenario: Scenario, caught: int, runs: int, mine: list[dict]) -> bool:
    clean = not any(r["also flagged"] or r["exit"] == 2 for r in mine)
    if scenario.want == "pass":
        return caught == 0 and clean
    need = runs if scenario.want == "missing" else np.ceil(CATCH * runs)
    return caught >= need and clean


def _median(values) -> str:
    values = [v for v in values if not np.isnan(v)]
    return f"{np.median(values):+.1%}" if values else ""


def _spread(mine: list[dict]) -> str:
    values = [r["largest change elsewhere"] for r in mine]
    values = [v for v in values if not np.isnan(v)]
    return f"{np.median(values):+.1%}, {max(values):+.1%}" if values else ""


def write_tables(out: Path, rows: list[dict], table: list[dict], header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path, data in ((out / "runs.csv", rows), (out / "summary.csv", table)):
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
    cols = list(table[0])
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in table]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _header(args) -> str:
    baseline = args.baseline.resolve()
    shown = baseline.relative_to(REPO) if baseline.is_relative_to(REPO) else baseline
    options = " ".join(args.compare_args) or "its defaults"
    return (
        f"harness.compare ({options}) against `{shown}`: {args.runs} fresh `regress` sweep(s) "
        f"per scenario, slowed variant `{args.variant}`; {time.strftime('%Y-%m-%d %H:%M %Z')}, "
        f"{_machine()}"
    )


def _machine() -> str:
    return f"{cpu_model()}, commit {git_commit()}"


# --- the command ----------------------------------------------------------------------------------
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("baseline", nargs="?", type=Path, default=REPO / "results/regress-baseline")
    p.add_argument("--runs", type=int, default=10, help="repetitions of each scenario")
    p.add_argument("--scenarios", default="", help="comma-separated subset (default: all)")
    p.add_argument("--variant", default="local", help="the variant slowed in the slow-* ones")
    p.add_argument(
        "--make-baseline", action="store_true",
        help=f"sweep BASELINE first ({BASELINE_ROUNDS} rounds) if it holds no run",
    )  # fmt: skip
    p.add_argument("--reuse", action="store_true", help="keep sweeps that finished before")
    p.add_argument("--work", type=Path, default=REPO / "build/compare-check")
    p.add_argument("--out", type=Path, default=REPO / "results/compare-check")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("compare_args", nargs="*", help="after --: passed to harness.compare")
    args = p.parse_args(argv)
    for name in ("baseline", "work", "out"):  # the sweeps run from the repository root
        setattr(args, name, getattr(args, name).resolve())
    return args


def run_matrix(args, matrix: dict[str, Scenario]) -> list[dict]:
    """Round i of every scenario, then round i + 1: a slow hour falls on all of them alike."""
    print(f"{args.runs} x {len(matrix)} sweeps, about a minute each on a quiet machine", flush=True)
    rows = []
    for i in range(1, args.runs + 1):
        for scenario in matrix.values():
            run_dir = args.work / f"{scenario.name}-{i}"
            why = sweep(run_dir, scenario.overrides, args.reuse, args.python)
            if why:
                row = run_line(scenario, run_dir, **{"why not compared": why})
            else:
                row = judge(scenario, args.baseline, run_dir, args.compare_args)
            rows.append(row)
            print(f"{scenario.name} {i}: exit {row['exit']}, flagged: {row['flagged'] or '-'}"
                  f"; else: {row['also flagged'] or '-'}", flush=True)  # fmt: skip
    return rows


def main(argv=None) -> int:
    args = parse(argv)
    matrix = scenarios(args.variant)
    chosen = [s for s in args.scenarios.split(",") if s] or list(matrix)
    unknown = set(chosen) - set(matrix)
    if unknown:
        sys.exit(f"unknown scenario(s) {sorted(unknown)}; choose among {', '.join(matrix)}")
    matrix = {k: matrix[k] for k in chosen}
    args.work.mkdir(parents=True, exist_ok=True)
    if args.make_baseline and not (args.baseline / "meta.json").is_file():
        why = sweep(args.baseline, [f"sweep.rounds={BASELINE_ROUNDS}"], False, args.python)
        if why:
            sys.exit(f"baseline: {why}")
    rows = run_matrix(args, matrix)
    table = summary(rows, matrix)
    write_tables(args.out, rows, table, _header(args))
    print((args.out / "summary.md").read_text())
    return 0 if all(r["met"] for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())

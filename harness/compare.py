"""``python -m harness.compare BASE NEW``: the regression check CI can trust (measurement.md).

**Environments first.** Two runs are compared only when they ran on the same device kind and
model (CPU or GPU name), threads, torch version, allocator and dtype set; a difference exits 2
saying what differs (``--allow-env-mismatch``: compared under a warning at the top). A field an
older run's meta.json lacks is unknown: said so, not held against it. A run that did not finish
(no finished stamp in meta.json) exits 2 too (``--allow-interrupted``: compared, warned).

**The reference: the other variants on the same shape, in both runs.** A shared machine drifts
by tens of percent between runs, and unevenly (a busy spell slows the shapes measured during
it), so absolute times are never compared. For each cell ``x = log(new time / base time)``
(medians of its pooled samples); the *drift* of a shape is the location of the ``x`` of the
other variants measured on it and ok in both runs (every option set of the judged variant's
name left out), and the cell's change is ``exp(x - drift) - 1``. Why this reference:

- a variant present in one run only is in no reference, so adding variants changes nothing,
  and removing one moves the others' references only by the one value it held among eight or
  nine (the old default, the median of every variant of each run, read +175% for every variant
  when six fast copies of ``linear`` were added);
- a fixed variant (``--reference sdpa_math`` still works) is blind to its own family: ``full``,
  ``sdpa``, ``sdpa_math`` and ``relative`` share one dense code path, and a bug there slows the
  reference with them; a calibration kernel per shape would do, but the sweep measures none
  (pytest-benchmark JSON has one: its control benchmark is the reference there);
- the location is the *shorth* (the median of the densest half, Rousseeuw's LMS location), not
  the median: when the dense family (4 of the 10 variants ok on CPU) slows together, a median of
  the others is pulled to the top of the untouched ones (a 1.3x family read +18% on synthetic
  runs), the shorth stays with the untouched majority (+23%) and is as steady in A/A runs.
  Leaving the judged variant out keeps its own slowdown out of its reference. A family of half
  the variants or more moving together is indistinguishable from the machine: not seen.

**Judgement where regressions live.** A variant measured on MIN_CELLS cells or more is judged as
a whole and in each of its groups (the parts ``inject_slowdown`` slows: fwd, fwd_bwd, decode,
causal, noncausal cells; a group of one cell, or the same cells as another, is not a group): a
group regresses when the median change of its cells passes ``--threshold`` (20%) AND a one-sided
rank test across its cells agrees. The signed-rank test cannot: over k cells its p-value is
never below ``2**-k``, 0.0625 for the four fwd_bwd cells of the regress grid, so a slowdown of
the backward alone could never be flagged. The test is its stratified form against the other
variants: on each cell's shape the variant's ``x`` is ranked among the variants there (under no
change all orders are equally likely, whatever the machine did to that shape), and the sum of
its ranks is referred to its exact distribution (independent uniform ranks): four cells among
ten variants reach 1e-4. A cell alone regresses only past ``--cell-threshold`` (100%: one cell
of two identical runs can drift by half) and a one-sided Mann-Whitney U test of its raw samples
(divided by the drift) against the base's. A variant with fewer cells (a micro-benchmark) is
judged cell by cell at ``--threshold``.

**Multiple comparisons: Holm per variant.** All the tests of one variant (its groups and its
cells) are one family, Holm-corrected at ``--alpha`` (0.01): more groups do not mean more false
alarms for a variant. The family is the variant, not the whole comparison: a correction over
every test would let adding a variant change the verdicts of the others.

**Everything else.** A cell ok in the base that fails now (oom, error, ...) is a regression; so
is a variant or cell ok in the base and missing from the new run (``--allow-missing``: a note);
a variant only in the new run is listed as new and never fails. Exact quantities must match
exactly: analytic and counted FLOPs, and peaks of tensor bytes (CUDA allocator; on CPU the
profiler's, where both runs' meta.json say so). The output: one ``REGRESSION`` line per
regression (variant, group, change, Holm-adjusted p), then the group and cell tables.

Exit status: 0 no regression, 1 regression, 2 the inputs cannot be compared (reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from harness import schema
from harness.results import find_run_dirs, key_text, options_dict, read_run, samples

COMMON = "common"  # --reference common: the other variants on the shape, ok in both runs
CONTROL = "control"  # pytest-benchmark JSON: the run's control benchmark
SHAPE = [c for c in schema.CELL_KEY if c not in ("variant", "options")]
EXACT = ("flops", "counted_flops", "peak_mem_mb")
GROUPS = ("all", "fwd", "fwd_bwd", "decode", "causal", "noncausal")  # inject_slowdown's parts
MIN_CELLS = 3  # a variant measured on fewer cells is judged cell by cell
MIN_OTHERS = 2  # other variants a shape needs for its drift (one would be a fixed reference)
ENV = ("device", "model", "threads", "torch", "allocator", "dtypes")


class Uncomparable(Exception):
    """The two inputs cannot be compared; the message says why (exit status 2)."""


@dataclass
class Side:
    """One input as read: a row per cell, the environment it ran in, runs that did not finish.

    cells: key, unit (variant and options), variant, options, shape (the drift's stratum),
    parts (the groups it belongs to), where (the shape in words), status, reason, samples (ms),
    is_ref (the fixed reference, if any), exact (the exact metrics it has, by name)."""

    path: Path
    cells: pd.DataFrame
    env: dict
    reference: str
    unfinished: list[str] = field(default_factory=list)


# --- loading: both input kinds become one table of cells ---------------------------------------
def load(path: Path, reference: str = COMMON) -> Side:
    path = Path(path)
    if not path.exists():
        raise Uncomparable(f"{path}: no such file or folder")
    if path.is_file() and path.suffix == ".json":
        return _from_benchmark_json(path)
    return _from_results(path, reference)


def _from_results(path: Path, reference: str) -> Side:
    runs = [read_run(d) for d in find_run_dirs(path)]
    with_rows = [r for r in runs if not r.rows.empty]
    if not with_rows:
        why = "; ".join(f"{r.path}: {r.reason}" for r in runs)
        raise Uncomparable(f"{path}: no results rows ({why})")
    rows = pd.concat([_speed_rows(r) for r in with_rows], ignore_index=True)
    rows = rows.drop_duplicates(schema.CELL_KEY, keep="last")
    if rows.empty:
        raise Uncomparable(f"{path}: no speed rows")
    if reference != COMMON and not rows["status"][rows["variant"] == reference].eq("ok").any():
        raise Uncomparable(
            f"{path}: no ok {reference!r} rows; ratios need the reference measured in the same run "
            "(choose another with --reference, or --reference common)"
        )
    cells = pd.DataFrame([_results_cell(r, reference) for _, r in rows.iterrows()])
    unfinished = [f"{r.path}: {r.status} ({r.reason})" for r in runs if not r.finished]
    return Side(path, cells, _merged([_run_env(r) for r in with_rows]), reference, unfinished)


def _speed_rows(run) -> pd.DataFrame:
    rows = run.rows[run.rows["kind"] == "speed"].copy()
    # CPU peaks are tensor bytes only in runs that say so; older ones held the RSS high-water mark
    tensor_bytes = str(run.meta.get("peak_memory", "")).startswith("tensor bytes")
    rows["peak_exact"] = rows["device"].str.startswith("cuda") | tensor_bytes
    return rows


def _results_cell(r: pd.Series, reference: str) -> dict:
    return {
        "key": "|".join(key_text(r[c]) for c in schema.CELL_KEY),
        "unit": f"{r['variant']} {r['options']}",
        "variant": r["variant"],
        "options": r["options"],
        "shape": "|".join(key_text(r[c]) for c in SHAPE),
        "parts": (r["pass"], "causal" if r["causal"] else "noncausal"),
        "where": _where(r),
        "status": r["status"],
        "reason": r["reason"],
        "samples": _samples_of(r),
        "is_ref": r["variant"] == reference,
        "exact": {
            m: _exact(r[f"{m}_text"]) for m in EXACT if m != "peak_mem_mb" or r["peak_exact"]
        },
    }


def _where(r) -> str:
    kv = f"/{key_text(r['kv_heads'])}" if r["kv_heads"] != r["heads"] else ""
    causal = " causal" if r["causal"] else ""
    return (
        f"{r['dtype']} B{key_text(r['batch'])} H{key_text(r['heads'])}{kv} "
        f"n{key_text(r['seq_len'])} d{key_text(r['head_dim'])}{causal} {r['pass']}"
    )


def _samples_of(r) -> list[float]:
    raw = samples(r["samples_ms"])
    if not raw and pd.notna(r["latency_ms"]):
        raw = [float(r["latency_ms"])]  # a median alone: the change works, the rank test cannot
    return raw


def _exact(text: str):
    """An exact value as written (ints stay ints: FLOP counts exceed float64's 2**53)."""
    text = str(text).strip()
    if text in ("", "nan", "None"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _run_env(run) -> dict:
    """What a run ran on; None where neither meta.json nor the rows say (an older run)."""
    meta, rows = run.meta, run.rows[run.rows["kind"] == "speed"]
    device = _env_value(meta, "device", rows, "device")
    cuda = bool(device) and device.startswith("cuda")
    return {
        "device": device and ("cuda" if cuda else device),
        "model": _env_value(meta, "gpu", rows, "gpu")
        if cuda
        else _env_value(meta, "cpu", rows, "cpu"),
        "threads": _env_value(meta, "threads", rows, "threads"),
        "torch": _env_value(meta, "torch_version", rows, "torch_version"),
        "allocator": _env_value(meta, "allocator"),
        "dtypes": _env_value(meta, "dtypes", rows, "dtype"),
    }


def _env_value(meta: dict, key: str, rows: pd.DataFrame | None = None, column: str = ""):
    """meta.json's value, else the set of values the rows hold, as text; None if neither."""
    value = meta.get(key)
    if value in (None, "", []) and rows is not None and column:
        value = sorted({key_text(v) for v in rows[column]} - {""})
    if isinstance(value, list | tuple | set):
        value = ",".join(sorted(key_text(v) for v in value))
    text = key_text(value)
    return text or None


def _merged(envs: list[dict]) -> dict:
    """One environment for an input of several runs (a multirun folder)."""
    out = {}
    for name in ENV:
        values = sorted({e[name] for e in envs if e[name] is not None})
        out[name] = " | ".join(values) if values else None
    return out


def _from_benchmark_json(path: Path) -> Side:
    """pytest-benchmark's ``--benchmark-json``: raw times in ``stats.data`` (seconds), the
    variant and shape in ``extra_info``, the reference a control benchmark of the same run."""
    try:
        data = json.loads(path.read_text())
        benches = data.get("benchmarks") or []
    except (OSError, ValueError, AttributeError) as e:
        raise Uncomparable(f"{path}: not a pytest-benchmark JSON file ({e})") from e
    if not benches:
        raise Uncomparable(f"{path}: no benchmarks in it")
    if not any(_is_control(b) for b in benches):
        raise Uncomparable(
            f"{path}: no control benchmark (extra_info control=true, or 'control' in its name)"
        )
    cells = pd.DataFrame([_bench_cell(b) for b in benches])
    return Side(path, cells, _bench_env(data, benches), CONTROL)


def _is_control(b: dict) -> bool:
    info = b.get("extra_info") or {}
    return bool(info.get("control")) or "control" in str(b.get("name", "")).lower()


def _bench_cell(b: dict) -> dict:
    info = b.get("extra_info") or {}
    stats = b.get("stats") or {}
    raw = stats.get("data") or ([stats["median"]] if "median" in stats else [])
    name = str(b.get("name") or b.get("fullname"))
    return {
        "key": f"{b.get('group') or ''}::{name}",
        "unit": name if _is_control(b) else str(info.get("variant", name)),
        "variant": name if _is_control(b) else str(info.get("variant", name)),
        "options": "",
        "shape": b.get("group") or "",  # the control of the group is its reference
        "parts": tuple(p for p in [info.get("pass")] if p),
        "where": f"{name} {info.get('shape', '')}".strip(),
        "status": "ok",
        "reason": "",
        "samples": [1000.0 * float(x) for x in raw],
        "is_ref": _is_control(b),
        "exact": {m: _exact(info[m]) for m in EXACT if m in info},
    }


def _bench_env(data: dict, benches: list[dict]) -> dict:
    """What the JSON says of its machine: the CPU, and the device, threads and dtypes the
    benchmarks put in extra_info; torch and the allocator it does not record."""
    infos = pd.DataFrame([b.get("extra_info") or {} for b in benches])
    cpu = ((data.get("machine_info") or {}).get("cpu") or {}).get("brand_raw")
    column = lambda c: sorted({key_text(v) for v in infos.get(c, [])} - {"", "nan"})
    env = {"device": column("device"), "model": cpu, "threads": column("threads"),
           "torch": None, "allocator": None, "dtypes": column("dtype")}  # fmt: skip
    return {k: _env_value(env, k) for k in ENV}


# --- is the comparison meaningful? ---------------------------------------------------------------
def check_inputs(base: Side, new: Side, allow_env_mismatch=False, allow_interrupted=False):
    """Warnings to print at the top; raises Uncomparable where the inputs must not be compared."""
    if base.reference != new.reference:
        raise Uncomparable(
            f"{base.path} and {new.path} are not the same kind of input (results folder, or "
            "pytest-benchmark JSON)"
        )
    warnings = []
    differs, unknown = env_differences(base.env, new.env)
    refused = [d for d in differs if not _allowed(d, allow_env_mismatch)]
    if refused:
        raise Uncomparable(
            "the runs ran in different environments: " + "; ".join(refused)
            + " (measure both on one machine, or --allow-env-mismatch[=FIELD,...] to compare"
            " anyway)"
        )  # fmt: skip
    warnings += [
        f"WARNING: environments differ ({d}); times may not be comparable" for d in differs
    ]
    warnings += [f"note: {u}" for u in unknown]
    for label, side in (("base", base), ("new", new)):
        if side.unfinished and not allow_interrupted:
            raise Uncomparable(
                f"the {label} run did not finish: " + "; ".join(side.unfinished)
                + " (resume it, or --allow-interrupted to compare what it holds)"
            )  # fmt: skip
        warnings += [f"WARNING: the {label} run did not finish: {u}" for u in side.unfinished]
    return warnings


def _allowed(difference: str, allow) -> bool:
    """``allow``: False (nothing), True or "all" (every field), or "model,threads" (those)."""
    if allow in (True, "all"):
        return True
    return bool(allow) and difference.split(":")[0] in str(allow).split(",")


def env_differences(base: dict, new: dict) -> tuple[list[str], list[str]]:
    """(fields that differ, fields unknown on one side): each as ``name: base vs new``."""
    differs, unknown = [], []
    for name in ENV:
        vb, vn = base.get(name), new.get(name)
        if vb is None or vn is None:
            side = "base" if vb is None else "new"
            if vb is not None or vn is not None:
                unknown.append(f"{name} unknown in the {side} run (not recorded), not compared")
        elif vb != vn:
            differs.append(f"{name}: {vb} (base) vs {vn} (new)")
    return differs, unknown


# --- comparing --------------------------------------------------------------------------------
@dataclass
class Comparison:
    cells: pd.DataFrame  # per common cell: variant, cell, times, drift, change, p, verdict
    groups: pd.DataFrame  # per variant and group: variant, group, cells, change, p, verdict
    regressions: list[str] = field(default_factory=list)  # the REGRESSION lines
    flagged: list[tuple[str, str]] = field(default_factory=list)  # (variant, group) of each
    new: list[str] = field(default_factory=list)  # variants only in the new run
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.regressions)


CELL_COLUMNS = ["variant", "cell", "base ms", "new ms", "time", "drift", "change", "p", "verdict"]
GROUP_COLUMNS = ["variant", "group", "cells", "change", "p", "verdict"]


def compare(
    base: Side, new: Side, threshold=0.2, alpha=0.01, cell_threshold=1.0, allow_missing=False
) -> Comparison:
    """Every common cell's change against its shape's drift, then each variant judged as a
    whole, by group and by cell (module docstring); missing, broken and new variants and
    cells, and exact metrics, beside."""
    b, n = base.cells.set_index("key"), new.cells.set_index("key")
    common = [k for k in b.index if k in n.index]
    if not common:
        raise Uncomparable("the two runs have no cell in common (variant, shape, dtype, pass)")
    names = unit_names(pd.concat([base.cells, new.cells]))
    res = Comparison(cells=pd.DataFrame(columns=CELL_COLUMNS), groups=pd.DataFrame())
    res.new = _new_units(b, n, names)
    _missing(res, b, n, names, allow_missing)
    _broken(res, b.loc[common], n.loc[common], names)
    timed = _timed(b.loc[common], n.loc[common], names, base.reference != COMMON)
    if timed.empty or timed["lg"].isna().all():
        raise Uncomparable("no common cell has a reference measured on its shape in both runs")
    res.groups = _judge(timed, threshold, cell_threshold, alpha)
    res.cells = timed[CELL_COLUMNS]
    _flag_timed(res, timed)
    _exact_changes(res, b.loc[common], n.loc[common], names)
    return res


def unit_names(cells: pd.DataFrame) -> dict[str, str]:
    """unit -> the variant's name; a name measured with several option sets shows, on each but
    the first seen (the sweep's own entry, before its extras), the options where it differs."""
    names = {}
    for variant, units in cells.drop_duplicates("unit").groupby("variant", sort=False):
        first = options_dict(units["options"].iloc[0])
        names[units["unit"].iloc[0]] = variant
        for unit, options in zip(units["unit"].iloc[1:], units["options"].iloc[1:], strict=True):
            o = options_dict(options)
            shown = ",".join(f"{k}={o.get(k)}" for k in sorted(set(o) | set(first))
                             if o.get(k) != first.get(k))  # fmt: skip
            names[unit] = f"{variant}[{shown or options}]"
    return names


def _new_units(b, n, names) -> list[str]:
    only = n[~n["unit"].isin(set(b["unit"]))]
    return [f"{names[u]} ({len(c)} cells)" for u, c in only.groupby("unit", sort=False)]


def _missing(res: Comparison, b, n, names, allow_missing: bool) -> None:
    """Cells ok in the base and absent from the new run: per variant, one line."""
    gone = b[~b.index.isin(n.index) & (b["status"] == "ok")]
    for unit, cells in gone.groupby("unit", sort=False):
        whole = not n["unit"].eq(unit).any()
        group = "all" if whole else "cells"
        what = (
            f"missing from the new run ({len(cells)} cells ok in the base)"
            if whole
            else f"{len(cells)} cells missing from the new run: " + ", ".join(cells["where"])
        )
        if allow_missing:
            res.notes.append(f"{names[unit]} {group}: {what} (allowed: --allow-missing)")
        else:
            _flag(res, names[unit], group, what + "; --allow-missing accepts it")


def _broken(res: Comparison, b, n, names) -> None:
    for key in b.index:
        sb, sn = b.at[key, "status"], n.at[key, "status"]
        if sb == "ok" and sn != "ok":
            reason = f": {n.at[key, 'reason']}" if n.at[key, "reason"] else ""
            _flag(res, names[b.at[key, "unit"]], f"cell {b.at[key, 'where']}", f"now {sn}{reason}")
        elif sb != "ok" and sn == "ok":
            res.notes.append(f"{names[b.at[key, 'unit']]} {b.at[key, 'where']}: fixed (was {sb})")


def _timed(b, n, names, fixed: bool) -> pd.DataFrame:
    """The cells ok with samples in both runs: their log time change ``x``, their shape's
    drift ``lg`` (log), their change against it ``d`` (log) and their rank on the shape."""
    ok = (b["status"] == "ok") & (n["status"] == "ok")
    ok &= b["samples"].map(bool) & n["samples"].map(bool)
    b, n = b[ok], n[ok]
    t = b[["unit", "shape", "parts", "where", "is_ref"]].copy()
    t["variant"] = b["variant"]  # by name: a variant's option sets share its code
    t["base samples"], t["new samples"] = b["samples"], n["samples"]
    t["base ms"], t["new ms"] = b["samples"].map(np.median), n["samples"].map(np.median)
    t["x"] = np.log(t["new ms"].astype(float) / t["base ms"].astype(float))
    t[["lg", "rank", "of"]] = _against_others(t, fixed)
    t["d"] = t["x"] - t["lg"]
    t["p"] = [_cell_p(r) for _, r in t.iterrows()]
    t["time"], t["drift"], t["change"] = np.expm1(t["x"]), np.expm1(t["lg"]), np.expm1(t["d"])
    t["variant"] = t["unit"].map(names)  # from here on: the name shown
    t["cell"] = t["variant"] + " " + t["where"]
    return t


def _against_others(t: pd.DataFrame, fixed: bool) -> pd.DataFrame:
    """Per cell, against the other variants on its shape (another name: a variant's option
    sets share its code): ``lg``, the shape's drift (the shorth of their ``x``; with a fixed
    reference, a control benchmark or ``--reference NAME``, that one's ``x``), and ``rank``
    (1 = least slowed) of its ``x`` among the ``of`` variants there, itself included."""
    out = pd.DataFrame({"lg": math.nan, "rank": 1, "of": 1}, index=t.index)
    for _, shape in t.groupby("shape"):
        x, names = shape["x"].to_numpy(), shape["variant"].to_numpy()
        for i, key in enumerate(shape.index):
            others = x[names != names[i]]
            drift = shorth(others) if len(others) >= MIN_OTHERS else math.nan
            out.loc[key] = [drift, 1 + int((others < x[i]).sum()), 1 + len(others)]
    if fixed:
        refs = t[t["is_ref"]].sort_values("unit").drop_duplicates("shape")
        out["lg"] = t["shape"].map(dict(zip(refs["shape"], refs["x"], strict=True)))
    return out


def shorth(values) -> float:
    """The median of the densest half (the shortest window holding n // 2 + 1 of the values,
    Rousseeuw's LMS location): where most variants' changes lie, not pulled by a minority that
    moved together as the plain median is."""
    v = np.sort(np.asarray(values, dtype=float))
    h = len(v) // 2 + 1
    start = int(np.argmin(v[h - 1 :] - v[: len(v) - h + 1]))  # first of the shortest windows
    return float(np.median(v[start : start + h]))


def _cell_p(c: pd.Series) -> float:
    """One-sided (slower) Mann-Whitney U of the new samples, divided by the shape's drift,
    against the base's."""
    base, new = np.asarray(c["base samples"]), np.asarray(c["new samples"])
    if len(base) < 2 or len(new) < 2 or pd.isna(c["lg"]):
        return math.nan
    return float(mannwhitneyu(new * math.exp(-c["lg"]), base, alternative="greater").pvalue)


def rank_sum_p(ranks, sizes) -> float:
    """P(sum of ranks >= the observed one) when each cell's rank is uniform on 1..size and the
    cells independent: what ranks among the variants on a shape do when nothing changed."""
    pmf = np.ones(1)
    for size in sizes:
        pmf = np.convolve(pmf, np.full(int(size), 1.0 / size))
    return float(min(1.0, pmf[int(sum(ranks)) - len(ranks) :].sum()))


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (a NaN, an untestable cell, counts as 1)."""
    p = np.nan_to_num(np.asarray(pvalues, dtype=float), nan=1.0)
    adjusted, running = np.empty_like(p), 0.0
    for i, k in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (len(p) - i) * p[k]))
        adjusted[k] = running
    return adjusted


def _judge(timed: pd.DataFrame, threshold, cell_threshold, alpha) -> pd.DataFrame:
    """The group table; writes each cell's verdict and Holm-adjusted p into ``timed``."""
    timed["verdict"] = ""
    timed.loc[timed["lg"].isna(), "verdict"] = "no reference on this shape"
    timed.loc[timed["is_ref"], "verdict"] = "reference"
    judged = timed[timed["lg"].notna() & ~timed["is_ref"]]
    rows = []
    for _, cells in judged.groupby("unit", sort=False):
        groups, verdicts, pvalues = _judge_unit(cells, threshold, cell_threshold, alpha)
        rows += groups
        timed.loc[verdicts.index, "verdict"] = verdicts
        timed.loc[pvalues.index, "p"] = pvalues  # Holm-adjusted, as the verdict used
    return pd.DataFrame(rows, columns=GROUP_COLUMNS)


def _judge_unit(cells: pd.DataFrame, threshold, cell_threshold, alpha):
    """(group rows, cell verdicts, cell p-values) of one variant: its groups and its cells are
    one Holm family."""
    tests = _group_tests(cells, threshold) if len(cells) >= MIN_CELLS else []
    lone = cell_threshold if len(cells) >= MIN_CELLS else threshold
    tests += [(None, [i], c["change"], c["p"], lone) for i, c in cells.iterrows()]
    adjusted = holm([t[3] for t in tests])
    groups, verdicts, pvalues = [], {}, {}
    for (group, members, change, _, limit), p in zip(tests, adjusted, strict=True):
        verdict = _verdict(change, p, limit, threshold, alpha)
        if group is None:
            verdicts[members[0]], pvalues[members[0]] = verdict, p
        else:
            groups.append([cells["variant"].iloc[0], group, len(members), change, p, verdict])
    return groups, pd.Series(verdicts, dtype=object), pd.Series(pvalues, dtype=float)


def _group_tests(cells: pd.DataFrame, threshold: float) -> list[tuple]:
    """(group, cell indices, median change, rank-sum p, threshold) of each group of 2+ cells;
    a group holding the same cells as one before it is that group again, not a new test."""
    tests, seen = [], set()
    for group in GROUPS:
        inside = [group == "all" or group in parts for parts in cells["parts"]]
        members = cells[inside]
        if len(members) < 2 or frozenset(members.index) in seen:
            continue
        seen.add(frozenset(members.index))
        change = float(np.expm1(np.median(members["d"])))
        p = rank_sum_p(members["rank"], members["of"])
        tests.append((group, list(members.index), change, p, threshold))
    return tests


def _verdict(change: float, p: float, limit: float, threshold: float, alpha: float) -> str:
    if change > limit:
        return "REGRESSION" if p < alpha else "slower, not significant"
    if change > threshold:
        return "slower (under the cell threshold)"
    return "faster" if change < -threshold else "ok"


def _flag_timed(res: Comparison, timed: pd.DataFrame) -> None:
    for _, g in res.groups[res.groups["verdict"] == "REGRESSION"].iterrows():
        _flag(
            res,
            g["variant"],
            g["group"],
            f"{g['change']:+.1%} over {g['cells']} cells (p {g['p']:.2g})",
        )
    for _, c in timed[timed["verdict"] == "REGRESSION"].iterrows():
        _flag(res, c["variant"], f"cell {c['where']}", f"{c['change']:+.1%} (p {c['p']:.2g})")


def _flag(res: Comparison, variant: str, group: str, what: str) -> None:
    res.regressions.append(f"REGRESSION {variant} {group}: {what}")
    res.flagged.append((variant, group))


def _exact_changes(res: Comparison, b, n, names) -> None:
    """Exact metrics of the common cells must match; a metric one side lacks is not compared
    (an older run's CPU peak was the RSS high-water mark, not tensor bytes: said once)."""
    one_sided = False
    for key in b.index:
        eb, en = b.at[key, "exact"], n.at[key, "exact"]
        one_sided |= ("peak_mem_mb" in eb) != ("peak_mem_mb" in en)
        for metric in EXACT:
            vb, vn = eb.get(metric), en.get(metric)
            if vb is not None and vn is not None and vb != vn:
                group = f"exact {b.at[key, 'where']}"
                _flag(res, names[b.at[key, "unit"]], group, f"{metric} {vb} -> {vn} (must match)")
    if one_sided:
        res.notes.append(
            "peak_mem_mb not compared: one run's CPU peaks are not tensor bytes (it was measured "
            "before they were; refresh the baseline)"
        )


# --- output -----------------------------------------------------------------------------------
def format_report(res: Comparison, warnings: list[str], threshold, alpha, cell_threshold) -> str:
    lines = [*warnings, *res.regressions]
    if res.new:
        lines.append("new (not judged): " + ", ".join(res.new))
    if not res.groups.empty:
        g = res.groups.copy()
        g["change"], g["p"] = g["change"].map(_pct), g["p"].map(_p)
        lines += ["", "Per variant and group (median change; rank test, Holm per variant):"]
        lines.append(g.to_string(index=False))
    c = res.cells.drop(columns="variant").copy()
    c["base ms"], c["new ms"] = c["base ms"].map(_ms), c["new ms"].map(_ms)
    for col in ("time", "drift", "change"):
        c[col] = c[col].map(_pct)
    c["p"] = c["p"].map(_p)
    lines += ["", "Per cell (time: new/base; drift: the shape's; change: time against drift):"]
    lines += [c.to_string(index=False), ""]
    lines += [f"note: {x}" for x in res.notes]
    lines.append(
        f"{len(c)} cells compared against the drift of their shape; a group regresses past "
        f"{threshold:.0%}, a lone cell past {cell_threshold:.0%}, each at alpha {alpha} (Holm "
        f"per variant): {len(res.regressions)} regression(s)."
    )
    return "\n".join(lines)


def _pct(x) -> str:
    return "" if pd.isna(x) else f"{x:+.1%}"


def _p(x) -> str:
    return "" if pd.isna(x) else f"{x:.2g}"


def _ms(x) -> str:
    return "" if pd.isna(x) else f"{x:.4g}"


@dataclass
class Outcome:
    """What one invocation concluded: the exit status, the text printed, the comparison."""

    code: int
    text: str
    comparison: Comparison | None = None


def run(argv: list[str] | None = None) -> Outcome:
    args = parser().parse_args(argv)
    try:
        base, new = load(args.base, args.reference), load(args.new, args.reference)
        warnings = check_inputs(base, new, args.allow_env_mismatch, args.allow_interrupted)
        res = compare(
            base, new, args.threshold, args.alpha, args.cell_threshold, args.allow_missing
        )
    except Uncomparable as e:
        return Outcome(2, f"cannot compare: {e}")
    text = format_report(res, warnings, args.threshold, args.alpha, args.cell_threshold)
    return Outcome(1 if res.failed else 0, text, res)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.compare",
        description="Compare two results folders (or pytest-benchmark JSON files) for regressions.",
    )
    p.add_argument("base", type=Path, help="results folder, results.csv or benchmark JSON")
    p.add_argument("new", type=Path)
    p.add_argument("--threshold", type=float, default=0.2, help="change a group must pass")
    p.add_argument(
        "--cell-threshold", type=float, default=1.0,
        help=f"change one cell of a variant measured on {MIN_CELLS}+ cells must pass alone",
    )  # fmt: skip
    p.add_argument("--alpha", type=float, default=0.01, help="significance, Holm per variant")
    p.add_argument(
        "--reference", default=COMMON,
        help="'common' (the other variants on the shape, ok in both runs) or a variant's name",
    )  # fmt: skip
    p.add_argument("--allow-missing", action="store_true", help="missing variants and cells: notes")
    p.add_argument(
        "--allow-env-mismatch", nargs="?", const="all", default=False, metavar="FIELD,...",
        help=f"compare anyway, warned: every field, or only these of {', '.join(ENV)}",
    )  # fmt: skip
    p.add_argument("--allow-interrupted", action="store_true", help="compare unfinished runs")
    return p


def main(argv: list[str] | None = None) -> int:
    outcome = run(argv)
    print(outcome.text, file=sys.stderr if outcome.code == 2 else sys.stdout)
    return outcome.code


if __name__ == "__main__":
    sys.exit(main())

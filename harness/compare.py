"""``python -m harness.compare BASE NEW``: the regression check CI can trust (measurement.md).

Absolute times from two runs are not comparable (shared machines drift by tens of percent), so
each cell's time is first divided by a reference measured in the same run on the same shape:
by default the median time of every variant on that shape (``--reference median``; one variant,
such as ``sdpa_math``, with ``--reference NAME``; in pytest-benchmark JSON, the control
benchmark). A cell's change is its ratio now against its ratio before. On this project's
shared 2-core machine one cell of two identical runs can still move by half, while all the
cells of one variant do not move together, so a variant measured on MIN_CELLS shapes or more
is judged as a whole: it regresses when the median change of its cells passes ``--threshold``
AND a one-sided Wilcoxon signed-rank test over its cells agrees at ``--alpha`` (with too few
cells for that test to reach alpha: every cell slower, each by its own rank test). One of its
cells alone regresses only past ``--cell-threshold``. A variant with fewer cells (a
micro-benchmark) is judged cell by cell: change past ``--threshold`` AND a one-sided
Mann-Whitney U test on the raw samples, each divided by its run's reference, at ``--alpha``.
Exact quantities (analytic and counted FLOPs, CUDA allocator peaks) must match exactly; a cell
that was ok and now fails (oom, error, ...) is a regression too.

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
from scipy.stats import mannwhitneyu, wilcoxon

from harness import schema
from harness.results import compact_options, find_run_dirs, read_run, samples

SHAPE = [c for c in schema.CELL_KEY if c not in ("variant", "options")]
EXACT = ("flops", "counted_flops", "peak_mem_mb")  # peak_mem_mb: exact on CUDA only
SHAPE_MEDIAN = "median"  # --reference median: the median time of every variant on the shape
COLUMNS = ["base ratio", "new ratio", "change", "p-value", "verdict"]
MIN_CELLS = 3  # a variant measured on fewer shapes is judged cell by cell


class Uncomparable(Exception):
    """The two inputs cannot be compared; the message says why (exit status 2)."""


# --- loading: both input kinds become one table of cells ---------------------------------------
# key, cell (display), variant, status, samples (ms), ref_median (ms), is_ref, exact (dict)


def load_cells(path: Path, reference: str) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise Uncomparable(f"{path}: no such file or folder")
    if path.is_file() and path.suffix == ".json":
        return _from_benchmark_json(path)
    return _from_results(path, reference)


def _from_results(path: Path, reference: str) -> pd.DataFrame:
    runs = [read_run(d) for d in find_run_dirs(path)]
    frames = [r.rows for r in runs if not r.rows.empty]
    if not frames:
        why = "; ".join(f"{r.path}: {r.reason}" for r in runs)
        raise Uncomparable(f"{path}: no results rows ({why})")
    rows = pd.concat(frames, ignore_index=True)
    rows = rows[rows["kind"] == "speed"].drop_duplicates(schema.CELL_KEY, keep="last")
    if rows.empty:
        raise Uncomparable(f"{path}: no speed rows")
    if reference == SHAPE_MEDIAN:
        ok = rows[rows["status"] == "ok"]
        medians = pd.Series([_median(r) for _, r in ok.iterrows()], index=ok.index, dtype=float)
        shape = ok.apply(_shape_key, axis=1)
        ref_median = medians.groupby(shape).median().to_dict()
        return _cells(rows, reference, ref_median)
    refs = rows[(rows["variant"] == reference) & (rows["status"] == "ok")]
    if refs.empty:
        raise Uncomparable(
            f"{path}: no ok {reference!r} rows; ratios need the reference measured in the same run "
            "(choose another with --reference)"
        )
    # Several option sets of the reference on one shape (rare): the one whose options sort first
    # wins (the last written below), so both runs pick the same.
    by_options = refs.sort_values("options", ascending=False)
    ref_median = {_shape_key(r): _median(r) for _, r in by_options.iterrows()}
    return _cells(rows, reference, ref_median)


def _cells(rows: pd.DataFrame, reference: str, ref_median: dict) -> pd.DataFrame:
    several = rows.groupby("variant")["options"].nunique()  # options shown only where needed
    out = [
        _results_cell(r, reference, ref_median, several[r["variant"]] > 1)
        for _, r in rows.iterrows()
    ]
    return pd.DataFrame(out)


def _results_cell(r: pd.Series, reference: str, ref_median: dict, show_options: bool) -> dict:
    cuda = r["device"].startswith("cuda")
    exact = {m: _exact(r[f"{m}_text"]) for m in EXACT if m != "peak_mem_mb" or cuda}
    return {
        "key": "|".join(str(v) for v in _cell_key(r)),
        "cell": _cell_name(r, show_options),
        "variant": r["variant"],
        "status": r["status"],
        "samples": _samples_of(r),
        "ref_median": ref_median.get(_shape_key(r), math.nan),
        "is_ref": r["variant"] == reference,
        "exact": exact,
    }


def _cell_key(r) -> tuple:
    return tuple(_text(r[c]) for c in schema.CELL_KEY)


def _shape_key(r) -> tuple:
    return tuple(_text(r[c]) for c in SHAPE)


def _text(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _cell_name(r, show_options: bool) -> str:
    opts = f"[{compact_options(r['options'])}]" if show_options else ""
    shape = (
        f"B{_text(r['batch'])} H{_text(r['heads'])} n{_text(r['seq_len'])} d{_text(r['head_dim'])}"
    )
    causal = " causal" if r["causal"] else ""
    return f"{r['variant']}{opts} {r['device']} {r['dtype']} {shape}{causal} {r['pass']}"


def _samples_of(r) -> list[float]:
    raw = samples(r["samples_ms"])
    if not raw and pd.notna(r["latency_ms"]):
        raw = [float(r["latency_ms"])]  # a median alone: ratios work, the rank test cannot
    return raw


def _median(r) -> float:
    raw = _samples_of(r)
    return float(np.median(raw)) if raw else math.nan


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


def _from_benchmark_json(path: Path) -> pd.DataFrame:
    """pytest-benchmark's ``--benchmark-json``: raw times in ``stats.data`` (seconds), the
    variant and shape in ``extra_info``, the reference a control benchmark of the same run."""
    try:
        benches = json.loads(path.read_text()).get("benchmarks") or []
    except (OSError, ValueError, AttributeError) as e:
        raise Uncomparable(f"{path}: not a pytest-benchmark JSON file ({e})") from e
    if not benches:
        raise Uncomparable(f"{path}: no benchmarks in it")
    controls = {}
    for b in benches:
        if _is_control(b):
            controls.setdefault(b.get("group") or "", _bench_samples(b))
    if not controls:
        raise Uncomparable(
            f"{path}: no control benchmark (extra_info control=true, or 'control' in its name)"
        )
    fallback = next(iter(controls.values()))  # a group without its own control uses the run's
    return pd.DataFrame([_bench_cell(b, controls, fallback) for b in benches])


def _is_control(b: dict) -> bool:
    info = b.get("extra_info") or {}
    return bool(info.get("control")) or "control" in str(b.get("name", "")).lower()


def _bench_samples(b: dict) -> list[float]:
    stats = b.get("stats") or {}
    data = stats.get("data") or ([stats["median"]] if "median" in stats else [])
    return [1000.0 * float(x) for x in data]


def _bench_cell(b: dict, controls: dict, fallback: list[float]) -> dict:
    info = b.get("extra_info") or {}
    group = b.get("group") or ""
    name = str(b.get("name") or b.get("fullname"))
    ref = controls.get(group, fallback)
    shape = info.get("shape", "")
    return {
        "key": f"{group}::{name}",
        "cell": f"{name} {shape}".strip(),
        "variant": str(info.get("variant", name)),
        "status": "ok",
        "samples": _bench_samples(b),
        "ref_median": float(np.median(ref)) if ref else math.nan,
        "is_ref": _is_control(b),
        "exact": {m: _exact(info[m]) for m in EXACT if m in info},
    }


# --- comparing --------------------------------------------------------------------------------
@dataclass
class Comparison:
    table: pd.DataFrame  # cell, base ratio, new ratio, change, p-value, verdict
    exact: list[str] = field(default_factory=list)  # exact metrics that changed
    notes: list[str] = field(default_factory=list)

    variants: pd.DataFrame = field(default_factory=pd.DataFrame)  # variant-level verdicts

    @property
    def regressions(self) -> list[str]:
        bad = self.table["verdict"].str.startswith(("REGRESSION", "BROKE"))
        return list(self.table.loc[bad, "cell"])

    @property
    def failed(self) -> bool:
        return bool(self.regressions or self.exact)


def compare(
    base: pd.DataFrame, new: pd.DataFrame, threshold=0.25, alpha=0.01, cell_threshold=1.0
) -> Comparison:
    """Per cell, then per variant: a variant measured on MIN_CELLS shapes or more regresses when
    the median change of its cells passes ``threshold`` and a signed-rank test over its cells
    agrees (one cell of a shared machine can drift by half for no reason; all of a variant's
    cells do not); one of its cells alone regresses only past ``cell_threshold``."""
    b, n = base.set_index("key"), new.set_index("key")
    common = [k for k in b.index if k in n.index]
    if not common:
        raise Uncomparable("the two runs have no cell in common (variant, shape, dtype, pass)")
    res = Comparison(table=pd.DataFrame())
    res.exact = [m for k in common for m in _exact_changes(b.loc[k], n.loc[k])]
    lines = [_compare_cell(b.loc[k], n.loc[k], threshold, alpha) for k in common]
    lines = [x for x in lines if x is not None]
    if not any(x["verdict"] != "no reference on this shape" for x in lines):
        raise Uncomparable("no common cell has the reference measured on its shape in both runs")
    res.table = pd.DataFrame(
        lines,
        columns=["cell", "variant", "base ratio", "new ratio", "change", "p-value", "verdict"],
    )
    res.variants = _judge_variants(res.table, threshold, alpha, cell_threshold)
    res.notes = _only_in(b, n, common)
    if (res.table["verdict"].str.contains("too few samples")).any():
        res.notes.append(
            "some cells have too few raw samples for the rank test at this alpha: record more "
            "timed blocks (pytest-benchmark: --benchmark-save-data keeps them in the JSON)"
        )
    return res


def _judge_variants(table: pd.DataFrame, threshold, alpha, cell_threshold) -> pd.DataFrame:
    """Variant verdicts; rewrites the cell verdicts of variants judged as a whole."""
    out = []
    timed = table["change"].notna()
    for variant, cells in table[timed].groupby("variant", sort=False):
        if len(cells) < MIN_CELLS:
            continue  # judged cell by cell at `threshold`, as the cell verdicts stand
        logs = np.log1p(cells["change"].to_numpy())
        median = float(np.expm1(np.median(logs)))
        p = float(wilcoxon(logs, alternative="greater").pvalue) if np.any(logs) else 1.0
        if 0.5 ** len(logs) < alpha:  # enough cells for the signed-rank test to reach alpha
            agree = p < alpha
        else:  # too few: every cell slower, each by its own rank test
            agree = bool((logs > 0).all() and (cells["p-value"] < alpha).all())
        slow = median > threshold and agree
        out.append(
            {
                "variant": variant,
                "cells": len(cells),
                "median change": median,
                "p-value": p,
                "verdict": "REGRESSION" if slow else "ok",
            }  # fmt: skip
        )
        for i in cells.index:
            verdict = table.at[i, "verdict"]
            if verdict == "REGRESSION" and not slow and cells.at[i, "change"] <= cell_threshold:
                table.at[i, "verdict"] = "slower, one cell (variant ok)"
            elif slow and cells.at[i, "change"] > threshold and verdict != "REGRESSION":
                table.at[i, "verdict"] = "REGRESSION (variant)"
    return pd.DataFrame(out, columns=["variant", "cells", "median change", "p-value", "verdict"])


def _exact_changes(rb, rn) -> list[str]:
    out = []
    for metric in EXACT:
        vb, vn = rb["exact"].get(metric), rn["exact"].get(metric)
        if vb is not None and vn is not None and vb != vn:  # absent on one side: not a count
            out.append(f"{rb['cell']}: {metric} changed {vb} -> {vn}")
    return out


def _compare_cell(rb, rn, threshold, alpha) -> dict | None:
    if rb["is_ref"] and rb["status"] == rn["status"]:
        return None  # ratio 1 by definition; its exact metrics are still compared
    line = {
        "cell": rb["cell"],
        "variant": rb["variant"],
        "base ratio": math.nan,
        "new ratio": math.nan,
        "change": math.nan,
        "p-value": math.nan,
    }
    if rb["status"] != "ok" and rn["status"] == rb["status"]:
        return None  # the same failure in both runs (a CUDA-only kernel on CPU): nothing moved
    if rb["status"] != "ok" or rn["status"] != "ok":
        return line | {"verdict": _status_verdict(rb["status"], rn["status"])}
    if not (rb["ref_median"] > 0 and rn["ref_median"] > 0) or not (rb["samples"] and rn["samples"]):
        return line | {"verdict": "no reference on this shape"}
    nb = np.asarray(rb["samples"]) / rb["ref_median"]  # per-sample ratios to the run's reference
    nn = np.asarray(rn["samples"]) / rn["ref_median"]
    ratio_b, ratio_n = float(np.median(nb)), float(np.median(nn))
    change = ratio_n / ratio_b - 1
    slower = change > 0
    p, testable = _rank_test(nn, nb, "greater" if slower else "less", alpha)
    line |= {"base ratio": ratio_b, "new ratio": ratio_n, "change": change, "p-value": p}
    if abs(change) <= threshold:  # both must agree: a small move is never a regression
        return line | {"verdict": "ok"}
    if not testable:
        return line | {"verdict": f"{'slower' if slower else 'faster'}? too few samples to test"}
    if p >= alpha:
        return line | {"verdict": f"{'slower' if slower else 'faster'}, not significant"}
    return line | {"verdict": "REGRESSION" if slower else "faster"}


def _status_verdict(sb: str, sn: str) -> str:
    if sb == "ok":
        return f"BROKE: now {sn}"
    return f"fixed (was {sb})" if sn == "ok" else f"{sn} (was {sb})"


def _rank_test(new, base, alternative, alpha) -> tuple[float, bool]:
    """One-sided Mann-Whitney U; ``testable`` is False when even total separation of so few
    samples could not reach ``alpha`` (the smallest exact p-value is 1 / C(n1 + n2, n1))."""
    if len(new) < 2 or len(base) < 2:
        return math.nan, False
    smallest_p = 1.0 / math.comb(len(new) + len(base), len(new))
    p = float(mannwhitneyu(new, base, alternative=alternative).pvalue)
    return p, smallest_p < alpha


def _only_in(b, n, common) -> list[str]:
    notes = []
    for label, frame in (("base", b), ("new", n)):
        only = [frame.loc[k, "cell"] for k in frame.index if k not in set(common)]
        if only:
            notes.append(
                f"{len(only)} cell(s) only in {label}: "
                + ", ".join(only[:10])
                + (" ..." if len(only) > 10 else "")
            )
    return notes


# --- output -----------------------------------------------------------------------------------
def format_report(res: Comparison, threshold: float, alpha: float, cell_threshold: float) -> str:
    t = res.table.copy()
    t["base ratio"] = t["base ratio"].map(lambda x: "" if pd.isna(x) else f"{x:.4g}")
    t["new ratio"] = t["new ratio"].map(lambda x: "" if pd.isna(x) else f"{x:.4g}")
    t["change"] = t["change"].map(lambda x: "" if pd.isna(x) else f"{x:+.1%}")
    t["p-value"] = t["p-value"].map(lambda x: "" if pd.isna(x) else f"{x:.2g}")
    lines = [t.drop(columns="variant").to_string(index=False), ""]
    if not res.variants.empty:
        v = res.variants.copy()
        v["median change"] = v["median change"].map(lambda x: f"{x:+.1%}")
        v["p-value"] = v["p-value"].map(lambda x: f"{x:.2g}")
        lines += [
            "Per variant (median over its cells; Wilcoxon signed-rank):",
            v.to_string(index=False),
            "",
        ]
    if res.exact:
        lines += ["Exact metrics that changed (must match exactly):"] + [
            f"  {e}" for e in res.exact
        ]
    lines += [f"note: {x}" for x in res.notes]
    lines.append(
        f"{len(t)} cells compared (threshold {threshold:.0%} on the ratio to the reference, "
        f"Mann-Whitney alpha {alpha}; a lone cell of a variant with {MIN_CELLS}+ cells past "
        f"{cell_threshold:.0%}): {len(res.regressions)} regression(s), "
        f"{len(res.exact)} exact mismatch(es)."
    )
    if res.regressions:
        lines.append("REGRESSIONS: " + "; ".join(res.regressions))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.compare",
        description="Compare two results folders (or pytest-benchmark JSON files) for regressions.",
    )
    parser.add_argument("base", type=Path, help="results folder, results.csv or benchmark JSON")
    parser.add_argument("new", type=Path)
    parser.add_argument("--threshold", type=float, default=0.25, help="ratio change that counts")
    parser.add_argument(
        "--cell-threshold", type=float, default=1.0,
        help="change one cell of a variant measured on 3+ shapes must pass alone",
    )  # fmt: skip
    parser.add_argument(
        "--reference", default=SHAPE_MEDIAN,
        help="variant every cell is divided by, or 'median' (every variant's median on the shape)",
    )  # fmt: skip
    parser.add_argument("--alpha", type=float, default=0.01, help="Mann-Whitney significance")
    args = parser.parse_args(argv)
    try:
        base = load_cells(args.base, args.reference)
        new = load_cells(args.new, args.reference)
        res = compare(base, new, args.threshold, args.alpha, args.cell_threshold)
    except Uncomparable as e:
        print(f"cannot compare: {e}", file=sys.stderr)
        return 2
    print(format_report(res, args.threshold, args.alpha, args.cell_threshold))
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())

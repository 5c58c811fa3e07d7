"""Assemble the report: one self-contained index.html (inline CSS, data: images) and its CSVs."""

from __future__ import annotations

import html
import json
import re
import sys
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from . import plots, tables
from .load import Run, load
from .published import LRA_TABLE1_SOURCE, lra_table1

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1200px;padding:1em 2em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0} th,td{border:1px solid #ccc;
padding:.25em .5em;text-align:left;vertical-align:top} th{background:#f3f3f3}
img{max-width:100%;height:auto;display:block;margin:.6em 0} nav a{margin-right:.8em}
.note{color:#555;font-size:.9em} .warn{background:#fff4e5;border-left:4px solid #f0a020;
padding:.4em .8em} .fail{background:#fdecea;border-left:4px solid #d93025;padding:.4em .8em}
.published{background:#eef4fb;border-left:4px solid #3b78c4;padding:.4em .8em}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em}
"""


@dataclass
class Context:
    runs: list[Run]
    rows: pd.DataFrame
    cells: pd.DataFrame
    reference: str
    colours: dict
    patterns: bool
    csv: dict = field(default_factory=dict)  # file name -> table written beside index.html


# --- small HTML helpers ------------------------------------------------------------------------
def esc(text) -> str:
    return html.escape(str(text))


def note(text: str, cls: str = "note") -> str:
    return f'<p class="{cls}">{esc(text)}</p>'


def img(uri: str | None, alt: str, missing: str) -> str:
    if uri is None:
        return note(missing)
    return f'<img src="{uri}" alt="{esc(alt)}">'


def table(df: pd.DataFrame, empty: str = "(none)", max_rows: int = 400) -> str:
    if df is None or df.empty:
        return note(empty)
    extra = note(f"... {len(df) - max_rows} more rows in the CSV") if len(df) > max_rows else ""
    return df.head(max_rows).to_html(index=False, escape=True, na_rep="", float_format=_fmt) + extra


def _fmt(x: float) -> str:
    return f"{x:,.4g}" if abs(x) < 1e6 else f"{x:.3e}"


# --- sections ----------------------------------------------------------------------------------
def sec_runs(ctx: Context) -> str:
    runs = tables.runs_table(ctx.runs, ctx.rows)
    ctx.csv["runs.csv"] = runs
    banner = "".join(
        note(f"Run {r.run} FAILED ({r.folder}): {r.detail}", "fail")
        if r.status == "failed"
        else note(f"Run {r.run} was interrupted ({r.folder}): {r.detail}", "warn")
        for r in runs.itertuples()
        if r.status in ("failed", "interrupted")
    )
    return banner + table(runs, "No results folders were given.")


def sec_latency(ctx: Context) -> str:
    ctx.csv["speed_cells.csv"] = ctx.cells[
        tables.SERIES + ["variant", "options", "seq_len", "latency_ms", "lat_lo", "lat_hi",
                         "noisy", "peak_mem_mb", "model_mem_mb", "flops", "gflops_per_s"]
    ]  # fmt: skip
    uri = plots.series_lines(
        ctx.cells, "latency_ms", "latency (ms)", ctx.colours, lo="lat_lo", hi="lat_hi"
    )
    text = "Median latency per variant; the band is the inter-quartile range of the timed blocks."
    return note(text) + _configs_note(ctx.cells) + img(uri, "latency", "No ok speed rows.")


def _configs_note(cells: pd.DataFrame) -> str:
    if cells.empty:
        return ""
    _, left_out = plots.top_configs(cells)
    if not left_out:
        return ""
    return note("Configs not drawn (their numbers are in the CSVs): " + "; ".join(left_out))


def sec_memory(ctx: Context) -> str:
    uri = plots.series_lines(
        ctx.cells, "peak_mem_mb", "peak memory (MB)", ctx.colours, extra="model_mem_mb"
    )
    text = (
        "Measured peak above the inputs (CUDA allocator, or the CPU process high-water mark); "
        "crosses: the variant's analytic memory model, where it has one."
    )
    return note(text) + img(uri, "peak memory", "No positive peak-memory measurements.")


def sec_throughput(ctx: Context) -> str:
    peaks = tables.matmul_peaks(ctx.runs, ctx.rows)
    uri = plots.series_lines(
        ctx.cells, "gflops_per_s", "achieved GFLOP/s", ctx.colours, hlines=peaks
    )
    text = (
        "Analytic FLOPs of the useful work / median latency. "
        "Black line: the matmul peak measured in the same run."
    )
    if not peaks:
        text += " (No run recorded matmul_peak_gflops in meta.json.)"
    return note(text) + img(uri, "throughput", "No FLOP counts to compute throughput from.")


def sec_speedup(ctx: Context) -> str:
    sp = tables.speedup(ctx.cells, ctx.reference)
    ctx.csv["speedup.csv"] = sp
    if sp.empty:
        return note(f"The reference {ctx.reference!r} has no ok speed rows: no speedups.", "warn")
    text = (
        f"{ctx.reference} time / variant time on the same source, config, pass and length: "
        "above 1 (blue) the variant is faster. Blank: not measured or not ok."
    )
    return note(text) + img(plots.speedup_heatmaps(sp, ctx.reference), "speedup", "No data.")


def sec_exponents(ctx: Context) -> str:
    exp = tables.exponents(ctx.cells)
    ctx.csv["exponents.csv"] = exp
    text = (
        f"Least-squares slope of log(metric) against log(n) over the largest {tables.FIT_POINTS} "
        "measured lengths of each series (scipy.stats.linregress), +/- its standard error; the "
        "fit range is given per row. 1 is linear growth, 2 quadratic."
    )
    shown = _exponents_wide(exp)
    missing = "No chart: it needs series with 3 or more lengths (the table has what there is)."
    chart = img(plots.exponent_chart(exp), "exponents", missing)
    return note(text) + chart + table(shown, "No speed series.")


def _exponents_wide(exp: pd.DataFrame) -> pd.DataFrame:
    """One row per series: "slope +/- stderr" of time and of memory, with the fit range."""
    if exp.empty:
        return exp
    text = exp.apply(_slope_text, axis=1)
    wide = exp.assign(text=text).pivot_table(
        index=tables.SERIES, columns="metric", values="text", aggfunc="first"
    )
    ranges = exp[exp["metric"] == "time"].set_index(tables.SERIES)["fit_range"]
    wide["fit range (time)"] = ranges.reindex(wide.index)
    wide = wide.rename(columns={"time": "time exponent", "memory": "memory exponent"})
    order = [c for c in ("time exponent", "memory exponent", "fit range (time)") if c in wide]
    return _flat(wide[order])


def _flat(wide: pd.DataFrame) -> pd.DataFrame:
    """A pivot as a plain table (no index/column names left over as stray header cells)."""
    wide.columns.name = None
    return wide.reset_index()


def _slope_text(r) -> str:
    if pd.isna(r["exponent"]):
        return r["note"]
    err = "" if pd.isna(r["stderr"]) else f" +/- {r['stderr']:.2f}"
    return f"{r['exponent']:.2f}{err}" + (f" ({r['note']})" if r["note"] else "")


def sec_crossover(ctx: Context) -> str:
    cx = tables.crossovers(ctx.cells, ctx.reference)
    ctx.csv["crossover.csv"] = cx
    text = (
        f"The length above which each variant stays faster than {ctx.reference}, interpolated "
        "linearly between the two measured lengths around the crossing on log-log axes."
    )
    return note(text) + table(cx, f"No series shares lengths with {ctx.reference}.")


def sec_accuracy(ctx: Context) -> str:
    acc = tables.accuracy(ctx.rows)
    ap = tables.approx(ctx.rows)
    joined = tables.accuracy_speed(acc, ctx.cells)
    ctx.csv |= {"accuracy.csv": acc, "approx.csv": ap, "accuracy_speed.csv": joined}
    parts = [_accuracy_ours(ctx, acc, joined), "<h3>Approximation error</h3>"]
    ap_text = "Relative error of each variant's output against full attention on the same q, k, v."
    if ap.empty:
        parts.append(note("No approximation-error rows in these results."))
    else:
        wide = ap.pivot_table(
            index=["source", "label"], columns=["input", "seq_len"], values="approx_error"
        )
        wide.columns = [f"{i} n={n:.0f}" for i, n in wide.columns]
        parts += [note(ap_text), table(_flat(wide))]
    parts += ["<h3>Published: Long Range Arena</h3>", _published()]
    return "".join(parts)


def _accuracy_ours(ctx: Context, acc: pd.DataFrame, joined: pd.DataFrame) -> str:
    if acc.empty:
        return note(
            "No accuracy rows in these results (no task was trained). attnbench's own accuracy "
            "appears here once the tasks have run; the published figures below are not ours.",
            "warn",
        )
    cell = (
        acc["accuracy"].map("{:.2f}".format)
        + acc["accuracy_std"].map(lambda s: "" if pd.isna(s) else f" +/- {s:.2f}")
        + acc["seeds"].map(lambda k: f" ({k} seeds)" if k > 1 else "")
    )
    wide = acc.assign(cell=cell).pivot_table(
        index=["source", "task", "seq_len"], columns="label", values="cell", aggfunc="first"
    )
    scatter = plots.accuracy_vs_speed(joined, ctx.colours)
    speed_note = (
        "Accuracy against speed (Long Range Arena's figure): speed from our speed rows of the same "
        "source at the task's length or the nearest measured one (fwd_bwd preferred), marker area "
        "= peak memory there. The matched lengths are in accuracy_speed.csv."
    )
    return (
        note("Test accuracy (%) from the best validation checkpoint: mean +/- std over seeds.")
        + table(_flat(wide))
        + img(plots.accuracy_bars(acc, ctx.colours), "accuracy", "")
        + note(speed_note)
        + img(scatter, "accuracy vs speed", "No speed rows match the trained variants.")
    )


def _published() -> str:
    text = (
        f"Published figures, not measured by attnbench: {LRA_TABLE1_SOURCE}. "
        "Shown for orientation only; their models, data and budgets differ from ours."
    )
    figures = lra_table1().map(lambda x: f"{x:.2f}" if isinstance(x, float) else x)
    return f'<div class="published">{note(text)}{table(figures)}</div>'


def sec_patterns(ctx: Context) -> str:
    if not ctx.patterns:
        return note("Attention patterns were not computed for this report.")
    from .patterns import SMALL_OPTIONS, D, N, attention_patterns

    pats = attention_patterns()
    ctx.csv["patterns.csv"] = pd.DataFrame(
        [
            {
                "variant": p.variant,
                "causal": p.causal,
                "method": p.method,
                "dtype": p.dtype,
                "visible_fraction": None if p.visible is None else float(p.visible.mean()),
                "note": p.note,
            }
            for p in pats
        ]
    )
    text = (
        f"Which keys (columns) each query (rows) sees, found from the code that rendered this "
        f"report, not from the results: on a random input of n={N}, 1 head, d={D}, (i, j) is "
        "black iff output i depends on value j (autograd; forward perturbation for variants with "
        "no backward on CPU). Small options so the structure shows: "
        + ", ".join(f"{k}={v}" for k, v in SMALL_OPTIONS.items())
        + " (each variant gets only the options it has)."
    )
    skipped = pd.DataFrame(
        [
            {"variant": p.variant, "causal": p.causal, "why not drawn": p.note}
            for p in pats
            if p.visible is None
        ]
    )
    return (
        note(text)
        + img(plots.pattern_grid(pats), "attention patterns", "No variant could be run on CPU.")
        + ("<h3>Not drawn</h3>" + table(skipped) if not skipped.empty else "")
    )


def sec_failures(ctx: Context) -> str:
    fail = tables.failures(ctx.rows)
    ctx.csv["failures.csv"] = fail
    noisy = ctx.cells[ctx.cells["noisy"]]
    noisy_html = ""
    if not noisy.empty:
        n = noisy.assign(iqr_over_median=noisy["latency_iqr_ms"] / noisy["latency_ms"])
        cols = tables.SERIES + ["seq_len", "latency_ms", "iqr_over_median"]
        noisy_html = "<h3>Noisy cells (IQR / median above 10%)</h3>" + table(n[cols], max_rows=60)
    return table(fail, "Every cell is ok.") + noisy_html


def sec_provenance(ctx: Context) -> str:
    prov = tables.provenance(ctx.runs, ctx.rows)
    ctx.csv["provenance.csv"] = prov
    metas = "".join(
        f"<details><summary>meta.json of {esc(run.name)} ({esc(run.path)})</summary>"
        f"<pre>{esc(json.dumps(run.meta, indent=2, sort_keys=True, default=str))}</pre></details>"
        for run in ctx.runs
        if run.meta
    )
    return table(prov, "No runs.") + metas


SECTIONS = [
    ("runs", "Runs", sec_runs),
    ("latency", "Latency against sequence length", sec_latency),
    ("memory", "Peak memory against sequence length", sec_memory),
    ("throughput", "Achieved throughput", sec_throughput),
    ("speedup", "Speedup over the reference", sec_speedup),
    ("exponents", "Growth exponents", sec_exponents),
    ("crossover", "Crossover lengths", sec_crossover),
    ("accuracy", "Accuracy", sec_accuracy),
    ("patterns", "Attention patterns", sec_patterns),
    ("failures", "Cells that are not ok", sec_failures),
    ("provenance", "Environment and provenance", sec_provenance),
]
SECTION_ERROR = "This section could not be drawn"


def _guarded(fn, ctx: Context) -> str:
    """A section that breaks on unexpected data says so; the rest of the report still renders."""
    try:
        return fn(ctx)
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        plots.plt.close("all")  # a figure half drawn when it broke
        return note(f"{SECTION_ERROR}: {type(e).__name__}: {e}", "fail")


# --- the page ---------------------------------------------------------------------------------
def build(results_dirs, out_dir=None, reference="sdpa", name=None, patterns=True) -> Path:
    runs, rows = load([Path(p) for p in results_dirs])
    cells = tables.speed_cells(rows)
    ctx = Context(runs, rows, cells, reference, plots.palette(rows["label"]), patterns)
    name = name or default_name(runs, results_dirs)
    folder = Path("reports" if out_dir is None else out_dir) / name
    body = [_guarded(fn, ctx) for _, _, fn in SECTIONS]
    folder.mkdir(parents=True, exist_ok=True)
    for fname, df in ctx.csv.items():
        df.to_csv(folder / fname, index=False)
    page = folder / "index.html"
    page.write_text(_html(name, ctx, body), encoding="utf-8")
    return page


def default_name(runs: list[Run], results_dirs) -> str:
    names = [r.name for r in runs] or [Path(p).name for p in results_dirs] or ["report"]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "+".join(dict.fromkeys(names)))[:80] or "report"


def _html(name: str, ctx: Context, body: list[str]) -> str:
    sources = ", ".join(sorted(set(ctx.rows["source"]))) or "none"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = " ".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title, _ in SECTIONS)
    sections = "".join(
        f'<section id="{sid}"><h2>{esc(title)}</h2>{html_}</section>'
        for (sid, title, _), html_ in zip(SECTIONS, body, strict=True)
    )
    header = note(
        f"Sources (device@commit): {sources}. Reference: {ctx.reference}. Rendered {stamp}."
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>attnbench report: {esc(name)}</title><style>{CSS}</style></head><body>"
        f"<h1>attnbench report: {esc(name)}</h1>{header}<nav>{nav}</nav>{sections}</body></html>"
    )

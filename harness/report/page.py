"""Assemble the report: one self-contained index.html (inline CSS and script, data: images) and
the CSVs of its tables. The answer comes first (summary), then the evidence."""

from __future__ import annotations

import re
import sys
import traceback
from datetime import datetime, timezone
from pathlib import Path

from . import plots
from .context import Context
from .load import load
from .markup import CSS, SCRIPT, esc, note
from .sec_answer import sec_runs, sec_summary
from .sec_speed import sec_decode, sec_exponents, sec_kernel, sec_speedup
from .sec_tasks import sec_accuracy, sec_failures, sec_patterns, sec_training

SECTIONS = [
    ("summary", "The answer: leaderboards", sec_summary),
    ("runs", "Runs", sec_runs),
    ("kernel", "Kernel speed and memory against n", sec_kernel),
    ("speedup", "Speed-up over the reference", sec_speedup),
    ("exponents", "Growth exponents", sec_exponents),
    ("decode", "Decoding one token", sec_decode),
    ("training", "Whole-model training step", sec_training),
    ("accuracy", "Accuracy over seeds", sec_accuracy),
    ("patterns", "Attention patterns", sec_patterns),
    ("failures", "Cells that are not ok", sec_failures),
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


# --- the page -------------------------------------------------------------------------------------
def build(results_dirs, out_dir=None, reference="sdpa", name=None, patterns=True) -> Path:
    data = load([Path(p) for p in results_dirs])
    ctx = Context(data, reference, patterns)
    name = name or default_name(data.runs, results_dirs)
    folder = Path("reports" if out_dir is None else out_dir) / name
    body = [_guarded(fn, ctx) for _, _, fn in SECTIONS]
    folder.mkdir(parents=True, exist_ok=True)
    for fname, df in ctx.csv.items():
        df.to_csv(folder / fname, index=False)
    page = folder / "index.html"
    page.write_text(_html(name, ctx, body), encoding="utf-8")
    return page


def default_name(runs_: list, results_dirs) -> str:
    names = [r.name for r in runs_] or [Path(p).name for p in results_dirs] or ["report"]
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "+".join(dict.fromkeys(names)))[:80] or "report"


def _html(name: str, ctx: Context, body: list[str]) -> str:
    run_names = ", ".join(r.name for r in ctx.data.runs) or "none"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = " ".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title, _ in SECTIONS)
    sections = "".join(
        f'<section id="{sid}"><h2>{esc(title)}</h2>{html_}</section>'
        for (sid, title, _), html_ in zip(SECTIONS, body, strict=True)
    )
    header = note(f"Runs: {run_names}. Reference: {ctx.reference}. Rendered {stamp}.")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>attnbench report: {esc(name)}</title><style>{CSS}</style></head><body>"
        f"<h1>attnbench report: {esc(name)}</h1>{header}<nav>{nav}</nav>{sections}"
        f"<script>{SCRIPT}</script></body></html>"
    )

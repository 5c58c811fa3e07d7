"""The page's first sections: the answer (a leaderboard per machine and its sentences), and
the runs it rests on, each once, with its commit and command."""

from __future__ import annotations

import json

import pandas as pd

from . import runs, summary, tables
from .context import Context
from .groups import EXACT_TEXT, GROUP_TEXT
from .markup import bullets, details, esc, note, sortable


def sec_summary(ctx: Context) -> str:
    rows = ctx.data.rows
    failed = rows[(rows["kind"] == "speed") & rows["status"].isin(["oom", "timeout", "error"])]
    failed = failed.assign(config=tables.config_label(failed))
    inp = summary.Inputs(
        ctx.cells,
        ctx.exps,
        ctx.dec,
        ctx.dec_exps,
        ctx.train,
        ctx.acc,
        ctx.reference,
        ctx.groups,
        failed,
    )
    boards = summary.boards(inp)
    if not boards:
        return note("No ok measurements in these results: nothing to summarise.", "warn")
    ctx.csv["leaderboard.csv"] = pd.concat([b.values.assign(machine=b.machine) for b in boards])
    ref = ctx.reference
    legend = (
        f"Columns: '\u00d7{ref}' = {ref}'s time / the variant's at that n (above 1 is faster); "
        f"'mem/{ref}' = peak tensor memory over {ref}'s (below 1 is less); 'exp' = growth "
        "exponent of time or memory in n (1 linear, 2 quadratic, see Growth exponents); 'oom' "
        "etc.: that cell failed; groups: exact, mask(ing), approx(imation), base(lines); 'acc' = "
        "test accuracy, mean +/- std over seeds (number of seeds); 'decode ms/token' = one "
        "decoding step at the longest context most variants share; 'train step \u00d7full' = "
        "whole-model training steps/s over full's. Click a header to sort."
    )
    groups = "; ".join(GROUP_TEXT[g] for g in ("exact", "masking", "approximation", "baselines"))
    defs = (
        f"Groups: {groups}. For 'fastest exact': {EXACT_TEXT} (relative is exact attention of a "
        "different function, with a bias, so it is not counted). Accuracy margin: "
        f"{summary.MARGIN:g} points."
    )
    parts = [note(legend), note(defs)]
    for b in boards:
        parts += [
            f"<h3>{esc(b.machine)}</h3>",
            f'<div class="answer">{bullets(b.sentences)}</div>',
            note(" ".join(b.notes)),
            sortable(b.values, b.texts, cls="board"),
        ]
    return "".join(parts)


# --- 2. runs --------------------------------------------------------------------------------------
def sec_runs(ctx: Context) -> str:
    rt = runs.runs_table(ctx.data)
    ctx.csv["runs.csv"] = rt
    banners = "".join(_banner(r) for r in rt.itertuples())
    shown = rt[["run", "status", "machine", "commit", "command", "started", "ok_rows"]].assign(
        finished=rt["finished"].replace("", "never (see status)"),
        environment=[
            f"torch {t}, {a or 'allocator ?'}, matmul peak {p}"
            for t, a, p in zip(rt["torch"], rt["allocator"], rt["matmul_peak_gflops"], strict=True)
        ],
        replaced_rows=rt["replaced_rows"],
    )
    texts = shown.astype(str)
    texts["ok_rows"] = [f"{ok} ok of {n}" for ok, n in zip(rt["ok_rows"], rt["rows"], strict=True)]
    texts["commit"] = [_commit_html(c) for c in shown["commit"]]
    texts["command"] = [f"<code>{esc(c)}</code>" for c in shown["command"]]
    replaced = (
        "A measurement made again by a later run on the same machine (same variant, options, "
        "shape and pass) is shown from the later run; 'replaced_rows' counts what each run lost."
    )
    metas = "".join(
        details(
            f"meta.json of {run.name} ({run.path})",
            f"<pre>{esc(json.dumps(run.meta, indent=2, sort_keys=True, default=str))}</pre>",
        )
        for run in ctx.data.runs
        if run.meta
    )
    if rt.empty:
        return note("No results folders were given.", "warn")
    return banners + sortable(shown, texts, raw={"commit", "command"}) + note(replaced) + metas


def _banner(r) -> str:
    where = f"({r.folder}): {r.detail}"
    if r.status == "failed":
        return note(f"Run {r.run} FAILED {where}", "fail")
    if r.status in ("interrupted", "running"):
        what = "is still running" if r.status == "running" else "was interrupted"
        return note(f"Run {r.run} {what}: its numbers are incomplete {where}", "warn")
    if r.dirty:
        return note(
            f"Run {r.run} was measured from UNCOMMITTED code ({runs.short_commit(r.commit)}): "
            "no commit reproduces it exactly.",
            "fail",
        )
    return ""


def _commit_html(commit: str) -> str:
    text = esc(runs.short_commit(commit))
    return text.replace("+dirty", ' <span class="dirty">+dirty: uncommitted code</span>')

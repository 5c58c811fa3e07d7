"""The model evidence: the whole training step beside the kernel, accuracy over seeds and
against speed (Long Range Arena's published figures beside ours), the recorded attention
patterns, and every cell that is not ok."""

from __future__ import annotations

import json

import pandas as pd

from harness.results import read_patterns

from . import accuracy as accm
from . import plots, tables, training
from .context import Context
from .markup import details, esc, img, note, one_machine, table
from .patterns import patterns_of
from .published import (
    LRA_TABLE1_SOURCE,
    LRA_TABLE2_NOTE,
    LRA_TABLE2_SOURCE,
    lra_points,
    lra_table1,
    lra_table2,
    lra_table2_wide,
)


def sec_training(ctx: Context) -> str:
    t = ctx.train
    source = f"Published figures, not measured by attnbench: {LRA_TABLE2_SOURCE}. {LRA_TABLE2_NOTE}"
    published = f'<div class="published">{note(source)}{table(lra_table2_wide())}</div>'
    if t.empty:
        none = "No train_step rows in these results (sweep=lra_table2_cpu measures them)."
        return note(none) + published
    cols = [
        "label",
        "seq_len",
        "steps_per_s",
        "speedup",
        "peak_mem_mb",
        "mem_ratio",
        "state_mb",
        "tokens_per_s",
        "kernel_vs_model",
        "run",
    ]
    ctx.csv["train_step.csv"] = t[
        training.MODEL_GROUP + cols + ["options", "kernel_x", "kernel_config"]
    ]
    text = (
        "One whole training step (forward, loss, backward, AdamW step) of the task encoder, "
        "Long Range Arena's Table 2 protocol: steps/s and peak tensor memory, and their ratio to "
        "full at the same model, batch and n ('speedup', 'mem_ratio'; state_mb: parameters, "
        "gradients and optimizer state). 'kernel x, model y': the attention kernel's fwd_bwd "
        "speed-up over full at the same variant and n (main config of that machine) beside the "
        "whole model's: how much of the kernel's win is left in a model. Each setup below "
        "states the model size and batch it used."
    )
    parts = [note(text)]
    for i, (title, g) in enumerate(training.setups(t)):
        body = table(ctx.looks.sort(g)[cols])
        if i == 0:
            chart = plots.train_chart(g, ctx.looks, lra_table2())
            parts += [f"<h3>{esc(title)}</h3>", body, img(chart, "training step", "")]
        else:
            parts.append(details(title, body))
    return "".join(parts) + published


# --- 6. accuracy ----------------------------------------------------------------------------------
def sec_accuracy(ctx: Context) -> str:
    acc = ctx.acc
    ap = accm.approx(ctx.data.rows)
    ctx.csv |= {"accuracy.csv": acc, "approx.csv": ap}
    parts = [
        _accuracy_ours(ctx, acc)
        if not acc.empty
        else note(
            "No accuracy rows in these results (no task was trained). The published figures below "
            "are not ours.",
            "warn",
        )
    ]
    parts += ["<h3>Approximation error</h3>", _approx(ap)]
    text = (
        f"Published figures, not measured by attnbench: {LRA_TABLE1_SOURCE}. "
        "Shown for orientation only; their models, data and budgets differ from ours."
    )
    figures = lra_table1().map(lambda x: f"{x:.2f}" if isinstance(x, float) else x)
    parts += [
        "<h3>Published: Long Range Arena</h3>",
        f'<div class="published">{note(text)}{table(figures)}</div>',
    ]
    return "".join(parts)


def _accuracy_ours(ctx: Context, acc: pd.DataFrame) -> str:
    acc = ctx.looks.sort(acc).sort_values(["machine", "task"], kind="stable")
    shown = acc.assign(
        accuracy=[accm.mean_text(r) for _, r in acc.iterrows()],
        range=[f"{a:.1f} .. {b:.1f}" for a, b in zip(acc["min"], acc["max"], strict=True)],
        p_full=acc["p_full"].map(lambda p: "" if pd.isna(p) else f"{p:.3f}"),
    )[
        [
            "machine",
            "task",
            "seq_len",
            "label",
            "options_text",
            "accuracy",
            "range",
            "why_stopped",
            "vs_full",
            "p_full",
            "vs_best",
        ]
    ]
    text = (
        "Test accuracy (%) of the best validation checkpoint, per seed (data order and initial "
        f"weights); mean +/- std, min .. max, number of seeds. Told apart by {accm.RULE}: "
        "'cannot tell from full' means the seeds do not separate the two."
    )
    return (
        note(text)
        + table(one_machine(shown).rename(columns={"options_text": "options trained"}))
        + img(plots.accuracy_dots(ctx.acc_rows, acc, ctx.looks), "accuracy per seed", "")
        + "<h3>Accuracy against speed</h3>"
        + _accuracy_speed(ctx, acc)
    )


def _accuracy_speed(ctx: Context, acc: pd.DataFrame) -> str:
    joined = accm.accuracy_speed(acc, ctx.train, ctx.cells)
    joined = pd.concat([accm.choose_speed(g) for _, g in joined.groupby("task", sort=True)])
    ctx.csv["accuracy_speed.csv"] = joined
    published = {t: lra_points(t, n) for t, n in joined.groupby("task")["seq_len"].max().items()}
    text = (
        "Long Range Arena's figure, per task: accuracy against speed-up over full, marker area = "
        "peak memory over full's. Speed is the whole-model training step of the very options "
        "trained where the task run recorded it; otherwise the attention kernel's fwd_bwd "
        "speed-up over full at the nearest measured length, from the variant's measured option "
        "set that agrees with most of the trained options (panel titles say which; "
        "accuracy_speed.csv has the match). Tinted panels: LRA's published accuracy (Table 1) "
        "against its Table 2 speed-up, not ours."
    )
    chart = plots.accuracy_vs_speed(joined, ctx.looks, published)
    left_out = joined[joined["x"].isna()]
    missing = ", ".join(f"{r.label} ({r.task})" for r in left_out.itertuples())
    return (
        note(text)
        + img(chart, "accuracy vs speed", "No speed rows for the trained variants.")
        + (note(f"Not drawn (no speed of the panel's kind): {missing}.") if missing else "")
    )


def _approx(ap: pd.DataFrame) -> str:
    if ap.empty:
        return note("No approximation-error rows in these results.")
    wide = ap.pivot_table(
        index=["machine", "task", "label"], columns=["input", "seq_len"], values="approx_error"
    )
    wide.columns = [f"{i} n={n:.0f}" for i, n in wide.columns]
    text = (
        "Relative error of each variant's output against full attention on the same q, k, v: "
        "'trained' inputs come from the trained model, 'random' from random tensors (where an "
        "untrained projection can rescale the values, so large numbers there say little)."
    )
    return note(text) + table(one_machine(wide.reset_index()))


# --- 7. patterns, failures ------------------------------------------------------------------------
def sec_patterns(ctx: Context) -> str:
    if not ctx.show_patterns:
        return note("Attention patterns were left out of this report.")
    parts, listed = [], []
    for run in ctx.data.runs:
        try:
            doc = read_patterns(run.path)
        except (OSError, ValueError) as e:
            parts.append(note(f"{run.name}: patterns.json unreadable: {e}", "warn"))
            continue
        if doc is None:
            continue
        pats = patterns_of(doc)
        listed += [
            {
                "run": run.name,
                "variant": p.variant,
                "label": p.label,
                "options": json.dumps(p.options),
                "causal": p.causal,
                "method": p.method,
                "visible_fraction": None if p.visible is None else float(p.visible.mean()),
                "note": p.note,
            }
            for p in pats
        ]
        skipped = pd.DataFrame(
            [x for x in listed if x["run"] == run.name and x["visible_fraction"] is None]
        )
        parts += [
            f"<h3>{esc(run.name)}</h3>",
            note(f"Recorded by the run: n = {doc.get('n')}, {doc.get('method', '')}"),
            img(plots.pattern_grid(pats), "attention patterns", "No pattern was drawn."),
            details("not drawn", table(skipped)) if not skipped.empty else "",
        ]
    ctx.csv["patterns.csv"] = pd.DataFrame(listed)
    if not listed and not parts:
        return note(
            "No run recorded attention patterns (patterns.json in its folder): the report "
            "draws only what a run recorded."
        )
    return "".join(parts)


def sec_failures(ctx: Context) -> str:
    fail = tables.failures(ctx.data.rows)
    ctx.csv["failures.csv"] = fail
    noisy = ctx.cells[ctx.cells["noisy"]]
    noisy_html = ""
    if not noisy.empty:
        n = noisy.assign(iqr_over_median=noisy["latency_iqr_ms"] / noisy["latency_ms"])
        cols = [
            "run",
            "machine",
            "config",
            "pass",
            "label",
            "seq_len",
            "latency_ms",
            "iqr_over_median",
        ]
        noisy_html = details(f"{len(n)} noisy cells (IQR / median above 10%)", table(n[cols]))
    return table(one_machine(fail), "Every cell is ok.") + noisy_html

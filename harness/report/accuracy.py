"""Accuracy over seeds, which differences are real, and the speed each trained variant runs at.

Rule for "cannot tell apart": Welch's t-test (unequal variances) on the per-seed accuracies,
two-sided, at ALPHA; with fewer than two seeds on either side nothing is ranked.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from .load import compact_options, options_dict
from .tables import main_config

ALPHA = 0.05
RULE = (
    f"Welch's t-test on the per-seed accuracies (two-sided, p < {ALPHA} counts as a "
    "difference); with one seed on either side nothing is ranked"
)
TASK_KEY = ["machine", "task", "seq_len"]
ACC_KEY = TASK_KEY + ["label", "variant", "options", "dtype"]


def accuracy_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The ok accuracy rows, as percent (a fraction is scaled), one per seed."""
    df = rows[(rows["kind"] == "accuracy") & (rows["status"] == "ok") & rows["accuracy"].notna()]
    if df.empty:
        return df.copy()
    scale = 100.0 if df["accuracy"].max() <= 1.0 else 1.0
    return df.assign(accuracy=df["accuracy"] * scale)


def accuracy_stats(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean, spread (std, min-max) and number of seeds per task and variant, and the verdicts
    against ``full`` and against the task's best."""
    cols = ACC_KEY + [
        "options_text",
        "mean",
        "std",
        "min",
        "max",
        "seeds",
        "why_stopped",
        "vs_full",
        "p_full",
        "vs_best",
    ]
    df = accuracy_rows(rows)
    if df.empty:
        return pd.DataFrame(columns=cols)
    g = df.groupby(ACC_KEY, dropna=False, sort=True)
    out = g["accuracy"].agg(mean="mean", std="std", min="min", max="max", seeds="count")
    out["why_stopped"] = g["stopped"].agg(_stopped_text)
    out["values"] = g["accuracy"].agg(list)
    out = out.reset_index()
    out["options_text"] = out["options"].map(compact_options)
    parts = [_verdicts(task) for _, task in out.groupby(TASK_KEY, dropna=False, sort=False)]
    return pd.concat(parts)[cols].reset_index(drop=True)


def _stopped_text(values) -> str:
    counts = pd.Series([v for v in values if str(v) not in ("", "nan")]).value_counts()
    return ", ".join(f"{n} {why}" for why, n in counts.items())


def _verdicts(task: pd.DataFrame) -> pd.DataFrame:
    task = task.copy()
    full = task[task["variant"] == "full"]
    best = task.loc[task["mean"].idxmax()]
    vs_full, p_full, vs_best = [], [], []
    for _, r in task.iterrows():
        if full.empty:
            vs_full.append("no full run")
            p_full.append(math.nan)
        elif r["variant"] == "full":
            vs_full.append("reference")
            p_full.append(math.nan)
        else:
            text, p = compare(r["values"], full.iloc[0]["values"], "full")
            vs_full.append(text)
            p_full.append(p)
        vs_best.append("best" if r["label"] == best["label"] else _vs_best(r, best))
    return task.assign(vs_full=vs_full, p_full=p_full, vs_best=vs_best)


def _vs_best(r, best) -> str:
    text, _ = compare(r["values"], best["values"], best["label"])
    if text.startswith("cannot"):
        return f"tied with the best ({best['label']})"
    return text if text.startswith("one seed") else "below"


def compare(a: list, b: list, name: str) -> tuple[str, float]:
    """How accuracies ``a`` compare with ``b`` (named ``name``), and the test's p-value."""
    if len(a) < 2 or len(b) < 2:
        return "one seed: not ranked", math.nan
    if np.std(a) == 0 and np.std(b) == 0:  # no spread: the t statistic is undefined
        p = 1.0 if np.mean(a) == np.mean(b) else 0.0
    else:
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    if p >= ALPHA or math.isnan(p):
        return f"cannot tell from {name}", p
    return f"{'above' if np.mean(a) > np.mean(b) else 'below'} {name}", p


def mean_text(r, short: bool = False) -> str:
    """``99.2 +/- 0.3 (3 seeds)`` (short: ``99.2±0.3 (3)``): the mean, the spread and how
    many seeds it rests on."""
    seeds = f"({r['seeds']:.0f})" if short else f"({r['seeds']:.0f} seed{'s' * (r['seeds'] > 1)})"
    if r["seeds"] < 2:
        return f"{r['mean']:.1f} {seeds}"
    spread = f"\u00b1{r['std']:.1f}" if short else f" +/- {r['std']:.1f}"
    return f"{r['mean']:.1f}{spread} {seeds}"


def approx(rows: pd.DataFrame) -> pd.DataFrame:
    """Relative error of each variant's output against ``full`` on the same inputs."""
    df = rows[(rows["kind"] == "approx") & (rows["status"] == "ok") & rows["approx_error"].notna()]
    cols = ["machine", "task", "label", "input", "seq_len"]
    if df.empty:
        return pd.DataFrame(columns=cols + ["approx_error"])
    return df.groupby(cols, dropna=False)["approx_error"].mean().reset_index()


# --- the speed of what was trained ----------------------------------------------------------------
def accuracy_speed(acc: pd.DataFrame, train: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Each accuracy point with its speed-up and memory ratio over ``full``: from the training
    step of the very options trained (``model_*``) and from the kernel's fwd_bwd speed rows of
    the same variant (``kernel_*``, option set matched by family, see :func:`match_label`)."""
    out = [
        a.to_dict() | _model_speed(a, train) | _kernel_speed(a, cells) for _, a in acc.iterrows()
    ]
    return pd.DataFrame(out, columns=list(acc.columns) + MODEL_COLS + KERNEL_COLS)


MODEL_COLS = ["model_x", "model_mem_x", "model_n"]
KERNEL_COLS = ["kernel_x", "kernel_mem_x", "kernel_n", "kernel_label", "kernel_config"]


def _model_speed(a, train: pd.DataFrame) -> dict:
    none = dict.fromkeys(MODEL_COLS, math.nan)
    if train.empty:
        return none
    same = train[(train["machine"] == a["machine"]) & (train["task"] == a["task"])]
    mine = same[(same["variant"] == a["variant"]) & (same["options"] == a["options"])]
    if mine.empty:
        return none
    n = _nearest(mine["seq_len"], a["seq_len"])
    r = mine[mine["seq_len"] == n].iloc[0]
    if pd.isna(r["speedup"]):
        return none
    return {"model_x": r["speedup"], "model_mem_x": r["mem_ratio"], "model_n": n}


def _kernel_speed(a, cells: pd.DataFrame) -> dict:
    none = dict.fromkeys(KERNEL_COLS, math.nan)
    c = cells[(cells["pass"] == "fwd_bwd") & (cells["machine"] == a["machine"])]
    if c.empty:
        c = cells[cells["pass"] == "fwd_bwd"]  # no kernel rows on that machine: any machine's
    c = c[c["config"] == main_config(c)] if not c.empty else c
    mine, full = c[c["variant"] == a["variant"]], c[c["variant"] == "full"]
    if mine.empty or full.empty:
        return none
    label = match_label(options_dict(a["options"]), option_sets(mine)[a["variant"]])
    mine = mine[mine["label"] == label]
    shared = sorted(set(mine["seq_len"]) & set(full["seq_len"]))
    if not shared:
        return none
    n = _nearest(pd.Series(shared), a["seq_len"])
    v, f = mine[mine["seq_len"] == n].iloc[0], full[full["seq_len"] == n]["latency_ms"].min()
    full_mem = full[full["seq_len"] == n]["peak_mem_mb"].min()
    return {
        "kernel_x": f / v["latency_ms"],
        "kernel_mem_x": v["peak_mem_mb"] / full_mem if full_mem > 0 else math.nan,
        "kernel_n": n,
        "kernel_label": label,
        "kernel_config": v["config"],
    }


def option_sets(cells: pd.DataFrame) -> dict:
    """variant -> {label: options (values as text)}, labels in the order first measured."""
    out: dict = {}
    for _, r in cells.sort_values("row_order").drop_duplicates("label").iterrows():
        opts = {k: str(v) for k, v in options_dict(r["options"]).items()}
        out.setdefault(r["variant"], {})[r["label"]] = opts
    return out


def match_label(trained: dict, candidates: dict) -> str:
    """The speed option set standing in for a trained one: the one agreeing with the most of
    the trained options (values compared as text); on a tie the first measured."""
    order = list(candidates)

    def score(label: str) -> tuple[int, int]:
        agree = sum(str(candidates[label].get(k)) == str(v) for k, v in trained.items())
        return agree, -order.index(label)

    return max(order, key=score)


def _nearest(lengths: pd.Series, target) -> float:
    lengths = lengths.to_numpy(float)
    if pd.isna(target):
        return float(lengths.max())
    return float(lengths[int(np.argmin(np.abs(np.log(lengths / target))))])


def choose_speed(g: pd.DataFrame) -> pd.DataFrame:
    """One kind of speed per task panel: the training step of the trained options where the
    task run recorded it for full and at least one other variant (points without one are
    left out of the panel), else the kernel for every point."""
    if g["model_x"].notna().sum() >= 2 and g.loc[g["variant"] == "full", "model_x"].notna().any():
        n = g["model_n"].max()
        return g.assign(
            x=g["model_x"],
            mem_x=g["model_mem_x"],
            speed_from=f"training step, same options, n={n:.0f}",
        )
    n = g["kernel_n"].dropna()
    where = f"n={n.min():.0f}" if n.nunique() == 1 else "nearest n"
    return g.assign(
        x=g["kernel_x"],
        mem_x=g["kernel_mem_x"],
        speed_from=f"kernel fwd_bwd, matched by family, {where}",
    )

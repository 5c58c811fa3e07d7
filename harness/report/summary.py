"""The answer first: one leaderboard per machine and three sentences generated from the data.

Every number in a leaderboard is taken from the tables the sections below show: kernel
speed-up and memory ratio over the reference at a few lengths of the machine's main config,
growth exponents, accuracy over seeds, decode cost and the training step's speed-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .accuracy import match_label, mean_text, option_sets
from .groups import GROUPS, group_of, is_exact
from .load import most_common, options_dict
from .tables import KERNEL_PASSES, main_config, short_n, slope_text

MARGIN = 2.0  # accuracy points below full's mean that still count as "as accurate"
SPEED = "\u00d7"  # "x sdpa": a speed-up column
SHORT = {"masking": "mask", "approximation": "approx", "baselines": "base"}  # the page's width


@dataclass
class Board:
    machine: str
    config: str
    values: pd.DataFrame  # numbers (what a column sorts by, and the CSV)
    texts: pd.DataFrame  # what a cell shows, same shape
    sentences: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class Inputs:
    cells: pd.DataFrame  # kernel speed cells
    exps: pd.DataFrame  # their exponents
    dec: pd.DataFrame  # decode cells
    dec_exps: pd.DataFrame
    train: pd.DataFrame  # train-step rows against full
    acc: pd.DataFrame  # accuracy stats
    reference: str
    groups: dict  # variant -> group
    failed: pd.DataFrame  # kernel cells that ran and failed (oom, timeout, error), with config


def boards(inp: Inputs) -> list[Board]:
    machines = [m for m in _machines(inp) if m]
    return [board(inp, m) for m in machines]


def _machines(inp: Inputs) -> list[str]:
    seen = [inp.cells, inp.dec, inp.train]
    found = [m for df in seen if not df.empty for m in df["machine"]]
    return list(dict.fromkeys(found)) or list(dict.fromkeys(inp.acc["machine"]))


def board(inp: Inputs, machine: str) -> Board:
    c = inp.cells[inp.cells["machine"] == machine]
    config = main_config(c)
    c = c[c["config"] == config]
    b = Builder(c, inp.groups)
    notes = [f"Kernel columns: config {config}." if config else "No kernel speed rows."]
    lengths = pick_lengths(c, inp.reference)
    failed = inp.failed[(inp.failed["machine"] == machine) & (inp.failed["config"] == config)]
    _kernel_columns(b, c, failed, lengths, inp.reference)
    _exponent_columns(b, inp.exps, machine, config)
    notes += _accuracy_columns(b, inp.acc, machine)
    notes += _decode_columns(b, inp.dec, inp.dec_exps, machine)
    notes += _train_columns(b, inp.train, machine)
    values, texts = b.frames()
    sentences = [
        fastest_exact(c),
        fastest_at_each_length(c),
        fastest_within_margin(values, texts, inp.reference),
    ]
    return Board(machine, config, values, texts, sentences, [n for n in notes if n])


# --- building the table ---------------------------------------------------------------------------
class Builder:
    """Rows keyed by label, in group order; columns added left to right."""

    def __init__(self, c: pd.DataFrame, groups: dict):
        self.variants = dict(zip(c["label"], c["variant"], strict=True))  # label -> variant
        self.option_sets = option_sets(c)
        self.groups = groups  # variant -> group
        self.values: dict[str, dict] = {}
        self.texts: dict[str, dict] = {}
        self.columns: list[str] = []

    def label_for(self, variant: str, options: str, own_label: str) -> str:
        """The row a measurement of (variant, options) goes to: the measured speed option set
        that agrees with most of its options (accuracy.match_label), or a row of its own."""
        if variant in self.option_sets:
            return match_label(options_dict(options), self.option_sets[variant])
        self.variants.setdefault(own_label, variant)
        return own_label

    def set(self, label: str, column: str, value, text: str | None = None) -> None:
        if column not in self.columns:
            self.columns.append(column)
        self.values.setdefault(label, {})[column] = value
        self.texts.setdefault(label, {})[column] = _fmt(value) if text is None else text

    def has(self, label: str, column: str) -> bool:
        return column in self.values.get(label, {})

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        group = {lb: self.groups.get(v) or group_of(v) for lb, v in self.variants.items()}
        rank = {g: i for i, g in enumerate(GROUPS)}
        labels = sorted(self.variants, key=lambda lb: (rank.get(group[lb], len(rank)), lb))
        head = pd.DataFrame(
            {"variant": labels, "group": [SHORT.get(group[lb], group[lb]) for lb in labels]}
        )
        values = pd.DataFrame([self.values.get(lb, {}) for lb in labels], columns=self.columns)
        texts = pd.DataFrame([self.texts.get(lb, {}) for lb in labels], columns=self.columns)
        return pd.concat([head, values], axis=1), pd.concat([head, texts.fillna("")], axis=1)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def pick_lengths(c: pd.DataFrame, reference: str) -> list[float]:
    """The shortest and the longest length the reference (else anything) measured: the page
    has room for two per pass and metric; the heatmap below has every length."""
    ref = c[c["variant"] == reference]
    lengths = sorted(set((ref if not ref.empty else c)["seq_len"]))
    return lengths[:1] + lengths[-1:] if len(lengths) > 1 else lengths


def _kernel_columns(b: Builder, c: pd.DataFrame, failed: pd.DataFrame, lengths, reference):
    """Speed-up and memory ratio over the reference; a cell that failed (oom, timeout, error)
    shows its status."""
    ref = c[c["variant"] == reference]
    for metric, col, invert in ((SPEED, "latency_ms", True), ("mem/", "peak_mem_mb", False)):
        for pss in KERNEL_PASSES:
            for n in lengths:
                r = ref[(ref["pass"] == pss) & (ref["seq_len"] == n)][col]
                if r.empty or not (r > 0).any():
                    continue
                name = f"{pss} {metric}{reference} {short_n(n)}"
                mine = c[(c["pass"] == pss) & (c["seq_len"] == n)]
                for label, v in mine.groupby("label")[col].min().items():
                    if v > 0:
                        b.set(label, name, r.min() / v if invert else v / r.min())
                lost = failed[(failed["pass"] == pss) & (failed["seq_len"] == n)]
                for label, status in zip(lost["label"], lost["status"], strict=True):
                    if label in b.variants and not b.has(label, name):
                        b.set(label, name, math.nan, status)


def _exponent_columns(b: Builder, exps: pd.DataFrame, machine: str, config: str) -> None:
    e = exps[(exps["machine"] == machine) & (exps["config"] == config)]
    # memory grows alike in both passes: one column for it
    for name, metric, pss in EXPONENT_COLUMNS:
        for _, r in e[(e["metric"] == metric) & (e["pass"] == pss)].iterrows():
            if pd.notna(r["exponent"]):
                b.set(r["label"], name, r["exponent"], slope_text(r["exponent"], math.nan))


def _accuracy_columns(b, acc: pd.DataFrame, machine: str) -> list[str]:
    if acc.empty:
        return ["No accuracy rows: no task was trained."]
    mine = acc[acc["machine"] == machine]
    note = ""
    if mine.empty:  # accuracy belongs to the mechanism more than to the machine
        other = most_common(acc["machine"])
        mine, note = acc[acc["machine"] == other], f"Accuracy measured on {other}."
    for _, r in mine.sort_values(["seeds", "mean"], ascending=False).iterrows():
        label = b.label_for(r["variant"], r["options"], r["label"])
        name = f"acc {r['task']} (%)"
        if not b.has(label, name):  # most seeds, then the best mean, when several map here
            b.set(label, name, r["mean"], mean_text(r, short=True))
    return [note, MATCHED]


EXPONENT_COLUMNS = (
    ("time exp fwd", "time", "fwd"),
    ("time exp fwd_bwd", "time", "fwd_bwd"),
    ("mem exp fwd_bwd", "memory", "fwd_bwd"),
)
MATCHED = (
    "Accuracy is shown on the row of the variant's measured option set that agrees with most "
    "of the trained options (tasks train smaller windows, blocks and projections)."
)


def _decode_columns(b, dec: pd.DataFrame, dec_exps: pd.DataFrame, machine: str) -> list[str]:
    d = dec[dec["machine"] == machine]
    if d.empty:
        return []
    sizes = d.groupby(["config", "kv"]).agg(cells=("label", "size"), kv_heads=("kv_heads", "max"))
    key = sizes.sort_values(["cells", "kv_heads"], ascending=False).index[0]  # all heads first
    d = d[(d["config"] == key[0]) & (d["kv"] == key[1])]
    n = common_length(d)
    e = dec_exps[(dec_exps["machine"] == machine) & (dec_exps["config"] == key[0])]
    e = e[(e["kv"] == key[1]) & (e["metric"] == "time")].set_index("label")
    for label, g in d.groupby("label"):
        row = b.label_for(g["variant"].iloc[0], g["options"].iloc[0], label)
        at = g[g["seq_len"] == n]["latency_ms"]
        if not at.empty:
            b.set(row, f"decode ms/token {short_n(n)}", float(at.min()))
        if label in e.index and pd.notna(e.loc[label, "exponent"]):
            r = e.loc[label]
            b.set(row, "decode exp", r["exponent"], slope_text(r["exponent"], math.nan))
    return [f"Decode columns: config {key[0]}, {key[1]}."]


def common_length(d: pd.DataFrame) -> float:
    """The longest length that the most series share."""
    cover = d.groupby("seq_len")["label"].nunique()
    return float(cover[cover == cover.max()].index.max())


def _train_columns(b, train: pd.DataFrame, machine: str) -> list[str]:
    t = train[(train["machine"] == machine) & train["speedup"].notna()]
    if t.empty:
        return []
    key = ["task", "model_text", "batch", "dtype"]
    top = t.groupby(key, dropna=False).size().sort_values(ascending=False).index[0]
    t = t[(t[key] == pd.Series(top, index=key)).all(axis=1)]
    n = common_length(t)
    for _, r in t[t["seq_len"] == n].iterrows():
        row = b.label_for(r["variant"], r["options"], r["label"])
        b.set(row, f"train step {SPEED}full {short_n(n)}", r["speedup"])
    return [f"Training-step column: task {top[0]}, model {top[1]}, batch {top[2]:.0f}."]


# --- the sentences --------------------------------------------------------------------------------
def fastest_exact(c: pd.DataFrame) -> str:
    exact = c[c["variant"].map(is_exact)]
    if exact.empty:
        return "Fastest exact variant: no exact variant was measured."
    return "Fastest exact variant: " + _winners(exact) + "."


def fastest_at_each_length(c: pd.DataFrame) -> str:
    if c.empty:
        return "Fastest variant at each length: no speed rows."
    return "Fastest variant at each length: " + _winners(c) + "."


def _winners(c: pd.DataFrame) -> str:
    parts = []
    for pss in [p for p in KERNEL_PASSES if p in set(c["pass"])]:
        p = c[c["pass"] == pss]
        best = p.loc[p.groupby("seq_len")["latency_ms"].idxmin()].sort_values("seq_len")
        parts.append(f"{pss}: " + spans(list(zip(best["seq_len"], best["label"], strict=True))))
    return "; ".join(parts)


def spans(pairs: list[tuple[float, str]]) -> str:
    """[(1024, a), (2048, a), (4096, b)] -> "a at n = 1k-2k, b at 4k"."""
    runs: list[list] = []
    for n, label in pairs:
        if runs and runs[-1][0] == label:
            runs[-1][2] = n
        else:
            runs.append([label, n, n])
    if len(runs) == 1:
        label, lo, hi = runs[0]
        return f"{label} at every length (n = {short_n(lo)}-{short_n(hi)})"
    return ", ".join(
        f"{label} at {short_n(lo)}" + (f"-{short_n(hi)}" if hi != lo else "")
        for label, lo, hi in runs
    )


def fastest_within_margin(values: pd.DataFrame, texts: pd.DataFrame, reference: str) -> str:
    """The fastest variant whose mean accuracy is within MARGIN points of full's on every task
    full was trained on, ranked by the kernel speed-up at the longest length (fwd_bwd first)
    where one of them ran; those that did not run there are named with why."""
    acc_cols = [col for col in values.columns if col.startswith("acc ")]
    full = values[values["variant"].map(lambda lb: lb.split("[")[0]) == "full"]
    columns = speed_columns(values)
    if not acc_cols or full.empty:
        return "Fastest within the accuracy margin: no accuracy rows for full to compare with."
    if not columns:
        return "Fastest within the accuracy margin: no kernel speed-ups to rank by."
    tasks = [col for col in acc_cols if full[col].notna().any()]
    floor = {col: full[col].max() - MARGIN for col in tasks}
    within = values[np.logical_and.reduce([values[col] >= floor[col] for col in tasks])]
    rank = {c: (within[c].notna().any(), c.startswith("fwd_bwd"), i) for i, c in enumerate(columns)}
    speed = max(columns, key=rank.get)
    ran = within[within[speed].notna()]
    names = ", ".join(col[4:].replace(" (%)", "") for col in tasks)
    head = f"Within {MARGIN:g} points of full's mean accuracy on every task it trained ({names})"
    if ran.empty:
        return head + ": no variant with a kernel speed-up qualifies."
    best = ran.loc[ran[speed].idxmax()]
    others = [
        lb
        + (
            f" ({texts.loc[i, speed] or 'not measured'} there)"
            if pd.isna(values.loc[i, speed])
            else ""
        )
        for i, lb in zip(within.index, within["variant"], strict=True)
        if lb != best["variant"]
    ]
    return (
        f"{head}: {best['variant']} is the fastest ({best[speed]:.2f}x over {reference} at n = "
        f"{speed.split()[-1]}, {speed.split()[0]}); "
        + (f"also within the margin: {', '.join(others)}." if others else "no other variant is.")
    )


def speed_columns(values: pd.DataFrame) -> list[str]:
    """The kernel speed-up columns, shortest length first."""
    return [c for c in values.columns if f" {SPEED}" in c and c.split()[0] in KERNEL_PASSES]

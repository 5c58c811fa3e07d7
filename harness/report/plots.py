"""The report's figures, each returned as a ``data:image/png;base64`` URI (no files, no network).

Every figure draws a variant in the colour :mod:`groups` gives it, and puts at most MAX_LINES
variants in a panel: panels are the variant groups (split further when a group is larger),
each with the reference drawn thin for comparison.
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # no display: the report is rendered on headless machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator  # noqa: E402

from .groups import GROUPS, colour, styles  # noqa: E402
from .published import lra_variant  # noqa: E402
from .tables import short_n  # noqa: E402

DPI = 80
MAX_LINES = 6
PANEL = (4.3, 2.5)  # inches per panel
plt.rcParams.update({"font.size": 8, "axes.grid": True, "grid.alpha": 0.3, "axes.titlesize": 8.5})


def data_uri(fig) -> str:
    """The figure as a PNG URI. Layouts are set by the caller (fixed margins or one
    tight_layout): a "tight" bounding box here would lay every figure out twice."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Looks:
    """label -> colour (the variant's), line style and marker (its option set)."""

    def __init__(self, labels: dict, groups: dict):
        self.variant = dict(labels)  # label -> variant
        self.groups = dict(groups)  # variant -> group
        self.style = styles(labels)  # in the order given: the first measured set draws solid

    def order(self, labels) -> list[str]:
        """Labels in group order (exact, masking, approximation, baselines), then by name."""
        rank = {g: i for i, g in enumerate(GROUPS)}

        def key(label):
            group = self.groups.get(self.variant.get(label, label), "other")
            return rank.get(group, len(rank)), label

        return sorted(set(labels), key=key)

    def sort(self, df: pd.DataFrame) -> pd.DataFrame:
        """Rows in the order of their labels (stable within a label), index reset."""
        rank = {label: i for i, label in enumerate(self.order(df["label"]))}
        return df.iloc[np.argsort(df["label"].map(rank).to_numpy(), kind="stable")].reset_index(
            drop=True
        )

    def colour(self, label: str):
        return colour(self.variant.get(label, label.split("[")[0]))

    def line(self, label: str) -> dict:
        ls, marker = self.style.get(label, ("-", "o"))
        return {"color": self.colour(label), "ls": ls, "marker": marker, "ms": 3.5, "lw": 1.4}


def panel_sets(df: pd.DataFrame, reference: str) -> list[tuple[str, list[str]]]:
    """(title, labels) per panel: the groups in order, packed whole into a panel while they
    fit in MAX_LINES and cut into MAX_LINES where one group alone is larger. The reference is
    drawn in every panel, so it does not take a place."""
    present = df[df["variant"] != reference].drop_duplicates("label")
    order = {g: i for i, g in enumerate(GROUPS)}
    groups = sorted(present.groupby("group"), key=lambda kv: order.get(kv[0], len(order)))
    out: list[tuple[str, list[str]]] = []
    for group, g in groups:
        labels = sorted(g["label"])
        if out and len(out[-1][1]) + len(labels) <= MAX_LINES and not out[-1][0].endswith(")"):
            out[-1] = (f"{out[-1][0]}, {group}", out[-1][1] + labels)
            continue
        chunks = [labels[i : i + MAX_LINES] for i in range(0, len(labels), MAX_LINES)]
        out += [
            (group + (f" ({i + 1})" if len(chunks) > 1 else ""), c) for i, c in enumerate(chunks)
        ]
    if not out and reference in set(df["variant"]):
        out = [("reference", [])]
    return out


def series_grid(df, y, ylabel, looks: Looks, reference, col="pass", col_order=None, **extra):
    """One row of panels per variant group, one column per ``col`` value: ``y`` against n on
    log-log axes. ``extra``: ``band=(lo, hi)`` shades a band; ``model=col`` draws an analytic
    model dotted; ``hlines=[(text, value)]`` horizontal lines (the matmul peak)."""
    df = df[df[y].notna() & (df[y] > 0)]
    if df.empty:
        return None
    sets = panel_sets(df, reference)
    cols = col_order or sorted(set(df[col]))
    cols = [c for c in cols if c in set(df[col])]
    fig, axes = plt.subplots(
        len(sets),
        len(cols),
        figsize=(PANEL[0] * len(cols), PANEL[1] * len(sets)),
        squeeze=False,
        sharex=True,
    )
    lengths = sorted(set(df["seq_len"]))
    for i, (title, labels) in enumerate(sets):
        for j, value in enumerate(cols):
            ax = axes[i][j]
            d = df[df[col] == value]
            for label in labels:
                _line(ax, d[d["label"] == label], y, looks, label, **extra)
            if not d["label"].isin(labels).any():
                ax.text(
                    0.5,
                    0.5,
                    f"no {value} rows for these variants",
                    transform=ax.transAxes,
                    ha="center",
                    fontsize=7,
                    color="grey",
                )
            for label in sorted(set(d.loc[d["variant"] == reference, "label"])):
                ref = d[d["label"] == label]
                ax.plot(ref["seq_len"], ref[y], color="black", lw=0.9, ls="-", marker=None)
            for text, value_ in extra.get("hlines", ()):
                ax.axhline(value_, color="black", ls="--", lw=0.9)
                ax.annotate(
                    text,
                    (0.01, value_),
                    xycoords=("axes fraction", "data"),
                    fontsize=6.5,
                    va="bottom",
                )
            ax.set_title(f"{title} | {value}")
            log_axes(ax, lengths)
        _row_legend(axes[i][-1], labels, looks, reference, extra.get("model"))
    for ax in axes[-1]:
        ax.set_xlabel("sequence length n")
    for row in axes:
        row[0].set_ylabel(ylabel)
    margins(fig, axes.shape, right=1.9)
    return data_uri(fig)


def margins(fig, shape, left=0.75, right=0.2, top=0.3, bottom=0.5, hgap=0.55, wgap=0.6):
    """Fixed margins and gaps in inches (a legend beside the last column needs ``right``):
    much cheaper than tight_layout, which measures every tick label."""
    rows, cols = shape
    w, h = PANEL[0] * cols + left + right + wgap * (cols - 1), PANEL[1] * rows + top + bottom
    fig.set_size_inches(w, h + hgap * (rows - 1))
    h += hgap * (rows - 1)
    fig.subplots_adjust(
        left=left / w,
        right=1 - right / w,
        top=1 - top / h,
        bottom=bottom / h,
        wspace=wgap / PANEL[0],
        hspace=hgap / PANEL[1],
    )


def _line(ax, s, y, looks: Looks, label, band=None, model=None, **_):
    s = s.sort_values("seq_len")
    if s.empty:
        return
    ax.plot(s["seq_len"], s[y], **looks.line(label))
    if band is not None:
        ax.fill_between(
            s["seq_len"], s[band[0]], s[band[1]], color=looks.colour(label), alpha=0.18, lw=0
        )
    if model is not None and s[model].notna().any():
        m = s[s[model] > 0]
        ax.plot(m["seq_len"], m[model], color=looks.colour(label), ls=":", marker="x", ms=4, lw=1)


def _row_legend(ax, labels, looks: Looks, reference, model):
    handles = [Line2D([], [], label=lb, **looks.line(lb)) for lb in labels]
    handles.append(Line2D([], [], color="black", lw=0.9, label=f"{reference} (reference)"))
    if model:
        handles.append(Line2D([], [], color="grey", ls=":", marker="x", label="analytic model"))
    ax.legend(
        handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False, fontsize=7
    )


def log_axes(ax, lengths):
    """Log-log axes ticked at the measured lengths (1k = 1024): readable, and cheap to draw."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    step = max(1, int(np.ceil(len(lengths) / 7)))
    ticks = lengths[::step]
    ax.set_xticks(ticks, [short_n(n) for n in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_locator(NullLocator())  # decades only: tick labels are the costly part
    ax.yaxis.set_minor_formatter(NullFormatter())


def speedup_heatmap(sp: pd.DataFrame, reference: str, looks: Looks):
    """Variant x length heatmaps of reference time / variant time, one per config and pass
    (of one machine); one colour scale for all, blue = faster."""
    sp = sp[sp["variant"] != reference]
    if sp.empty:
        return None
    keys = list(sp.groupby(["config", "pass"]).groups)[:6]
    ncols = min(2, len(keys))
    nrows = int(np.ceil(len(keys) / ncols))
    n_labels = sp["label"].nunique()
    lim = float(np.nanmax(np.abs(np.log2(sp["speedup"])))) or 1.0
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.6 * ncols, (0.3 * n_labels + 1.2) * nrows), squeeze=False
    )
    for ax, (config, pss) in zip(axes.flat, keys, strict=False):
        s = sp[(sp["config"] == config) & (sp["pass"] == pss)]
        t = s.pivot_table(index="label", columns="seq_len", values="speedup", aggfunc="median")
        t = t.reindex(looks.order(t.index))
        ax.imshow(np.log2(t.to_numpy(float)), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        for (i, j), v in np.ndenumerate(t.to_numpy(float)):
            if np.isfinite(v):
                ax.text(
                    j,
                    i,
                    f"{v:.2g}",
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="white" if abs(np.log2(v)) > 0.6 * lim else "black",
                )
        ax.set_xticks(range(len(t.columns)), [short_n(n) for n in t.columns])
        ax.set_yticks(range(len(t.index)), list(t.index))
        ax.grid(False)
        ax.set_title(f"{config} | {pss}")
        ax.set_xlabel("sequence length n")
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    return data_uri(fig)


def exponent_chart(exp: pd.DataFrame, looks: Looks):
    """Fitted exponents +/- 1 standard error per variant, one panel per metric and pass
    (of one machine and config); dotted lines at 0, 1 and 2."""
    exp = exp[exp["exponent"].notna()]
    if exp.empty:
        return None
    keys = sorted(
        set(zip(exp["metric"], exp["pass"], strict=True)), key=lambda k: (k[0] != "time", k)
    )
    labels = looks.order(exp["label"])
    fig, axes = plt.subplots(
        1,
        len(keys),
        figsize=(2.6 * len(keys) + 1.2, 0.24 * len(labels) + 1.2),
        squeeze=False,
        sharey=True,
    )
    y = np.arange(len(labels))
    for ax, (metric, pss) in zip(axes[0], keys, strict=True):
        e = exp[(exp["metric"] == metric) & (exp["pass"] == pss)].set_index("label").reindex(labels)
        for yi, (label, r) in zip(y, e.iterrows(), strict=True):
            if pd.notna(r["exponent"]):
                ax.errorbar(
                    r["exponent"],
                    yi,
                    xerr=0 if pd.isna(r["stderr"]) else r["stderr"],
                    fmt="o",
                    ms=4,
                    capsize=2,
                    color=looks.colour(label),
                )
        for ref in (0, 1, 2):
            ax.axvline(ref, color="grey", ls=":", lw=1)
        ax.set_title(f"{metric} | {pss}")
    axes[0][0].set_yticks(y, labels)
    axes[0][0].invert_yaxis()
    fig.supxlabel("slope of log(metric) against log(n)", fontsize=8)
    fig.tight_layout()
    return data_uri(fig)


# --- accuracy -------------------------------------------------------------------------------------
def accuracy_dots(acc_rows: pd.DataFrame, acc: pd.DataFrame, looks: Looks):
    """One panel per task: each seed a small dot, the mean a large one, the bar +/- std."""
    if acc.empty:
        return None
    tasks = sorted(set(acc["task"]))
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(3.6 * len(tasks), 0.3 * acc["label"].nunique() + 1.3), squeeze=False
    )
    for ax, task in zip(axes[0], tasks, strict=True):
        a = looks.sort(acc[acc["task"] == task])
        for i, r in a.iterrows():
            c = looks.colour(r["label"])
            seeds = acc_rows[(acc_rows["task"] == task) & (acc_rows["label"] == r["label"])]
            ax.plot(seeds["accuracy"], [i] * len(seeds), "o", ms=2.5, color=c, alpha=0.6)
            err = 0 if pd.isna(r["std"]) else r["std"]
            ax.errorbar(r["mean"], i, xerr=err, fmt="D", ms=5, color=c, capsize=2)
        ax.set_yticks(
            range(len(a)), [f"{lb} ({n:.0f})" for lb, n in zip(a["label"], a["seeds"], strict=True)]
        )
        ax.invert_yaxis()
        ax.set_title(f"{task}: test accuracy (%)")
    fig.tight_layout()
    return data_uri(fig)


def accuracy_vs_speed(joined: pd.DataFrame, looks: Looks, published: dict):
    """Long Range Arena's figure per task: accuracy against speed-up over full, marker area =
    memory over full's; LRA's published points in a panel of their own beside ours.
    ``joined`` has ``x``, ``mem_x`` and ``speed_from`` per point; ``published``: task -> frame."""
    joined = joined[joined["x"].notna()]
    if joined.empty:
        return None
    tasks = sorted(set(joined["task"]))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.6 * len(tasks)), squeeze=False)
    for (ours, theirs), task in zip(axes, tasks, strict=True):
        d = joined[joined["task"] == task]
        _ours(ours, d, looks)
        ratio_axis(ours, d["x"])
        if _has(published, task):
            _published(theirs, published[task], looks)
            ratio_axis(theirs, published[task]["speedup"])
        else:
            theirs.axis("off")
            theirs.text(0, 0.5, f"Long Range Arena has no {task} task.", color="grey")
    fig.tight_layout()
    return data_uri(fig)


def ratio_axis(ax, xs):
    """A log2 x axis of speed-ups (..., 0.5x, 1x, 2x, ...) spanning the points and 0.5x .. 2x,
    at most seven ticks."""
    xs = np.asarray(xs, float)
    xs = xs[np.isfinite(xs) & (xs > 0)]
    lo, hi = min(xs.min(initial=1.0), 0.5) / 1.4, max(xs.max(initial=1.0), 2.0) * 1.4
    ax.set_xscale("log", base=2)
    ax.set_xlim(lo, hi)
    e0, e1 = int(np.ceil(np.log2(lo))), int(np.floor(np.log2(hi)))
    step = max(1, int(np.ceil((e1 - e0 + 1) / 7)))
    ax.set_xticks([2.0**e for e in range(e0, e1 + 1) if e % step == 0])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}\u00d7"))
    ax.xaxis.set_minor_locator(NullLocator())


def _has(published: dict, task: str) -> bool:
    return task in published and not published[task].empty


def _size(mem_x):
    return 60 * np.clip(np.nan_to_num(np.asarray(mem_x, float), nan=1.0), 0.05, 20) ** 0.5


def _ours(ax, d: pd.DataFrame, looks: Looks):
    for _, r in d.iterrows():
        c = looks.colour(r["label"])
        ax.scatter(
            r["x"], r["mean"], s=_size(r["mem_x"]), color=c, alpha=0.75, edgecolor="k", lw=0.4
        )
        err = 0 if pd.isna(r["std"]) else r["std"]
        ax.errorbar(r["x"], r["mean"], yerr=err, color=c, lw=1, capsize=2)
        ax.annotate(
            r["label"], (r["x"], r["mean"]), fontsize=6.5, xytext=(4, 3), textcoords="offset points"
        )
    ax.axvline(1, color="grey", ls=":", lw=1)
    sizes = [ax.scatter([], [], s=_size(m), color="grey", alpha=0.5) for m in (0.25, 1, 4)]
    ax.legend(sizes, ["memory 0.25x full", "1x", "4x"], fontsize=6, frameon=False, loc="best")
    ax.set_title(f"{d['task'].iloc[0]} (ours): {d['speed_from'].iloc[0]}", fontsize=7.5)
    ax.set_xlabel("speed-up over full (faster ->)")
    ax.set_ylabel("test accuracy (%), mean +/- std")


def _published(ax, p: pd.DataFrame, looks: Looks):
    for _, r in p.iterrows():
        c = looks.colour(r["variant"]) if r["variant"] else "grey"
        ax.scatter(
            r["speedup"],
            r["accuracy"],
            s=_size(r["mem_ratio"]),
            facecolor="none",
            edgecolor=c,
            lw=1.4,
            marker="D",
        )
        ax.annotate(
            r["model"],
            (r["speedup"], r["accuracy"]),
            fontsize=6.5,
            xytext=(4, 3),
            textcoords="offset points",
            color="#3b78c4",
        )
    ax.set_facecolor("#eef4fb")
    ax.set_title(f"PUBLISHED, not ours: LRA (TPU), n = {p['n'].iloc[0] // 1024}K", fontsize=7.5)
    ax.set_xlabel("speed-up over Transformer (LRA Table 2)")
    ax.set_ylabel("test accuracy (%) (LRA Table 1)")


# --- training step --------------------------------------------------------------------------------
def train_chart(train: pd.DataFrame, looks: Looks, lra: pd.DataFrame):
    """Steps/s and peak memory against n per variant (ours), and LRA's published Table 2 in
    panels of their own (tinted, titled as published)."""
    if train.empty:
        return None
    ours = [("steps_per_s", "training steps / s"), ("peak_mem_mb", "peak tensor memory (MB)")]
    theirs = [("steps_per_s", "steps / s"), ("memory_gb", "peak memory per device (GB)")]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), squeeze=False)
    lengths = sorted(set(train["seq_len"]))
    for ax, (col, ylabel) in zip(axes[0][:2], ours, strict=True):
        for label, s in train.groupby("label"):
            s = s.sort_values("seq_len")
            ax.plot(s["seq_len"], s[col], label=label, **looks.line(label))
        log_axes(ax, lengths)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("sequence length n")
        ax.set_title("ours: " + ylabel)
    axes[0][1].legend(fontsize=6.5, frameon=False, loc="best")
    for ax, (col, ylabel) in zip(axes[0][2:], theirs, strict=True):
        for model, s in lra.groupby("model"):
            variant = lra_variant(model)
            c = looks.colour(variant) if variant else "grey"
            ax.plot(s["seq_len"], s[col], color=c, ls="--", marker="D", ms=3, lw=1, label=model)
        log_axes(ax, sorted(set(lra["seq_len"])))
        ax.set_facecolor("#eef4fb")
        ax.set_title("PUBLISHED (LRA Table 2, TPU v3): " + ylabel, fontsize=7.5)
        ax.set_xlabel("sequence length n")
    axes[0][3].legend(fontsize=6, frameon=False, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return data_uri(fig)


# --- patterns -------------------------------------------------------------------------------------
def pattern_grid(patterns: list, ncols: int = 6):
    """Each recorded pattern as a black-on-white (query x key) image."""
    drawn = [p for p in patterns if p.visible is not None]
    if not drawn:
        return None
    nrows = int(np.ceil(len(drawn) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.0 * ncols, 2.3 * nrows), squeeze=False)
    for ax, p in zip(axes.flat, drawn, strict=False):
        ax.imshow(p.visible, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        causal = " causal" if p.causal else ""
        ax.set_title(f"{p.label}{causal}\n{p.visible.mean():.0%} of pairs", fontsize=7.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    for ax in axes.flat[len(drawn) :]:
        ax.axis("off")
    fig.supxlabel("key j (black: query i sees key j)", fontsize=8)
    fig.supylabel("query i", fontsize=8)
    fig.tight_layout()
    return data_uri(fig)

"""The report's figures, each returned as a ``data:image/png;base64`` URI (no files, no network)."""

from __future__ import annotations

import base64
import io
import itertools
import warnings

import matplotlib

matplotlib.use("Agg")  # no display: the report is rendered on headless machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import NullFormatter, NullLocator  # noqa: E402

from .load import most_common  # noqa: E402

DPI = 90
MAX_CONFIGS = 4  # facet rows per figure; the rest are listed in the caption, not drawn
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]

sns.set_theme(style="whitegrid", context="notebook", font_scale=0.85)


def data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def palette(labels) -> dict:
    """One colour per variant, the same in every figure of the report."""
    labels = sorted(set(labels))
    name = "tab10" if len(labels) <= 10 else "tab20" if len(labels) <= 20 else "husl"
    colours = sns.color_palette(name, len(labels))
    return dict(zip(labels, colours, strict=True))


def source_styles(sources) -> dict:
    """Sources (device@commit) told apart by line style and marker."""
    cycle = zip(itertools.cycle(LINESTYLES), itertools.cycle(MARKERS))
    return dict(zip(sorted(set(sources)), cycle, strict=False))


def top_configs(cells: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The configs drawn (most cells first) and those left out."""
    order = list(cells["config"].value_counts().index)
    return order[:MAX_CONFIGS], order[MAX_CONFIGS:]


def series_lines(cells, y, ylabel, colours, lo=None, hi=None, extra=None, hlines=()):
    """One line per (variant, source) against n on log-log axes, facets: config x pass.

    ``lo``/``hi`` give a shaded band; ``extra`` a second column drawn as crosses (the analytic
    model); ``hlines`` (source, text, value) horizontal lines (the matmul peak)."""
    df = cells[cells[y].notna() & (cells[y] > 0)]
    if df.empty:
        return None
    configs, _ = top_configs(df)
    df = df[df["config"].isin(configs)]
    styles = source_styles(df["source"])
    passes = [p for p in ("fwd", "fwd_bwd") if p in set(df["pass"])] or sorted(set(df["pass"]))
    grid = sns.FacetGrid(
        df,
        row="config",
        col="pass",
        row_order=configs,
        col_order=passes,
        height=2.8,
        aspect=1.35,
        sharey="row",
        margin_titles=True,
        despine=False,
    )

    def draw(data, **_):
        ax = plt.gca()
        for (label, source), s in data.groupby(["label", "source"]):
            s = s.sort_values("seq_len")
            ls, marker = styles[source]
            c = colours[label]
            ax.plot(s["seq_len"], s[y], ls=ls, marker=marker, ms=3.5, color=c, lw=1.4)
            if lo is not None:
                ax.fill_between(s["seq_len"], s[lo], s[hi], color=c, alpha=0.2, lw=0)
            if extra is not None and s[extra].notna().any():
                ax.plot(s["seq_len"], s[extra], ls="none", marker="x", ms=4, color=c)
        for source, text, value in hlines:
            if source in set(data["source"]):
                ax.axhline(value, color="black", ls=styles[source][0], lw=1)
                ax.annotate(
                    f"matmul peak {text} {value:,.0f}".replace("  ", " "),
                    (0.01, value),
                    xycoords=("axes fraction", "data"),
                    fontsize=7,
                    va="bottom",
                )

    grid.map_dataframe(draw)
    for ax in grid.axes.flat:
        _length_axis(ax, sorted(set(df["seq_len"])))
    grid.set_axis_labels("sequence length n", ylabel)
    _legend(grid.figure, df, colours, styles, extra_marker="analytic model" if extra else None)
    return data_uri(grid.figure)


def _length_axis(ax, lengths):
    """Log-log axes ticked at the measured lengths (1k = 1024): readable, and cheap to draw."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    step = max(1, int(np.ceil(len(lengths) / 8)))
    ticks = lengths[::step]
    ax.set_xticks(ticks, [_short(n) for n in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _short(n: float) -> str:
    return f"{n / 1024:g}k" if n >= 1024 and n % 1024 == 0 else f"{n:.0f}"


def _legend(fig, df, colours, styles, extra_marker=None):
    handles = [Line2D([], [], color=colours[lb], lw=2, label=lb) for lb in sorted(set(df["label"]))]
    if len(styles) > 1 or extra_marker:
        handles.append(Line2D([], [], ls="none", label=""))
    if len(styles) > 1:
        for source, (ls, marker) in styles.items():
            handles.append(Line2D([], [], color="grey", ls=ls, marker=marker, label=source))
    if extra_marker:
        handles.append(Line2D([], [], color="grey", ls="none", marker="x", label=extra_marker))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def speedup_heatmaps(sp: pd.DataFrame, reference: str, max_panels: int = 8):
    """Variant x length heatmaps of reference time / variant time, one per source/config/pass."""
    sp = sp[sp["variant"] != reference]
    if sp.empty:
        return None
    keys = list(sp.groupby(["source", "config", "pass"]).groups)[:max_panels]
    ncols = min(2, len(keys))
    nrows = int(np.ceil(len(keys) / ncols))
    n_labels = sp["label"].nunique()
    lim = float(np.nanmax(np.abs(np.log2(sp["speedup"])))) or 1.0  # one colour scale for all
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(6.2 * ncols, (0.42 * n_labels + 1.6) * nrows), squeeze=False
    )
    for ax, key in zip(axes.flat, keys, strict=False):
        s = sp[(sp["source"] == key[0]) & (sp["config"] == key[1]) & (sp["pass"] == key[2])]
        table = s.pivot_table(index="label", columns="seq_len", values="speedup", aggfunc="median")
        table.columns = [f"{c:.0f}" for c in table.columns]
        with warnings.catch_warnings():  # seaborn 0.13 calls a colormap API matplotlib retires
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            sns.heatmap(
                np.log2(table),
                annot=table,
                fmt=".2g",
                cmap="RdBu",
                center=0,
                vmin=-lim,
                vmax=lim,
                ax=ax,
                cbar=False,
                linewidths=0.5,
                annot_kws={"fontsize": 7},
            )
        ax.grid(False)
        ax.set_title(f"{key[0]} | {key[1]} | {key[2]}", fontsize=8)
        ax.set_xlabel("sequence length n")
        ax.set_ylabel("")
        ax.tick_params(axis="y", labelrotation=0)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    return data_uri(fig)


def exponent_chart(exp: pd.DataFrame):
    """Fitted exponents with +/- 1 standard error; dotted lines at 1 (linear), 2 (quadratic)."""
    exp = exp[exp["stderr"].notna()]  # two-point slopes have no uncertainty: table only
    if exp.empty:
        return None
    parts = ["label", "source", "config", "pass"]
    parts = [p for p in parts if p == "label" or exp[p].nunique() > 1] or ["label"]
    exp = exp.assign(series=exp[parts].astype(str).agg("  ".join, axis=1))
    metrics = [m for m in ("time", "memory") if m in set(exp["metric"])]
    rows = sorted(set(exp["series"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 0.28 * len(rows) + 1.4))
    for ax, metric in zip(np.atleast_1d(axes), metrics, strict=True):
        e = exp[exp["metric"] == metric].set_index("series").reindex(rows)
        y = np.arange(len(rows))
        ax.errorbar(e["exponent"], y, xerr=e["stderr"].fillna(0), fmt="o", ms=4, capsize=2)
        for ref in (1, 2):
            ax.axvline(ref, color="grey", ls=":", lw=1)
        ax.set_yticks(y, rows if ax is np.atleast_1d(axes)[0] else [""] * len(rows))
        ax.set_title(f"{metric}: slope of log {metric} vs log n")
        ax.invert_yaxis()
    fig.tight_layout()
    return data_uri(fig)


def accuracy_bars(acc: pd.DataFrame, colours: dict):
    if acc.empty:
        return None
    grid = sns.catplot(
        data=_named(acc),
        x="task",
        y="accuracy",
        hue="variant",
        col="source",
        kind="bar",
        palette=colours,
        errorbar=None,
        height=3.2,
        aspect=1.4,
        legend_out=True,
    )
    grid.set_axis_labels("task", "test accuracy (%)")
    return data_uri(grid.figure)


def accuracy_vs_speed(joined: pd.DataFrame, colours: dict):
    """Long Range Arena's figure: accuracy against speed, marker area = peak memory."""
    if joined.empty:
        return None
    joined = _named(joined)
    tasks = sorted(set(joined["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 3.8), squeeze=False)
    has_mem = joined["peak MB"].notna().any()
    for ax, task in zip(axes.flat, tasks, strict=True):
        d = joined[joined["task"] == task]
        sns.scatterplot(
            data=d,
            x="calls_per_s",
            y="accuracy",
            hue="variant",
            palette=colours,
            ax=ax,
            size="peak MB" if has_mem else None,
            sizes=(40, 500),
            alpha=0.75,
            style="source" if d["source"].nunique() > 1 else None,
            legend=ax is axes.flat[-1],
        )
        for _, r in d.iterrows():
            ax.annotate(
                r["variant"],
                (r["calls_per_s"], r["accuracy"]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        n = most_common(d["speed_n"].map("{:.0f}".format))
        ax.set_title(f"{task} (speed at n ~ {n})")
        ax.set_xlabel("attention calls per second (faster ->)")
        ax.set_ylabel("test accuracy (%)")
    if axes.flat[-1].get_legend() is not None:
        sns.move_legend(axes.flat[-1], "center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.tight_layout()
    return data_uri(fig)


def _named(df: pd.DataFrame) -> pd.DataFrame:
    """Legend titles a reader understands (``label`` is the variant with its options)."""
    df = df.drop(columns=["variant"], errors="ignore")
    return df.rename(columns={"label": "variant", "peak_mem_mb": "peak MB"})


def pattern_grid(patterns: list, ncols: int = 6):
    """Each computed pattern as a black-on-white (query x key) image."""
    drawn = [p for p in patterns if p.visible is not None]
    if not drawn:
        return None
    nrows = int(np.ceil(len(drawn) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.1 * ncols, 2.5 * nrows), squeeze=False)
    for ax, p in zip(axes.flat, drawn, strict=False):
        ax.imshow(p.visible, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        frac = p.visible.mean()
        ax.set_title(f"{p.variant}{' causal' if p.causal else ''}\n{frac:.0%} of pairs", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[len(drawn) :]:
        ax.axis("off")
    fig.supxlabel("key j (black: query i sees key j)", fontsize=9)
    fig.supylabel("query i", fontsize=9)
    fig.tight_layout()
    return data_uri(fig)

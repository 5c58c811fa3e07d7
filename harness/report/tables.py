"""The kernel-level numbers: speed series and what is fitted on them (also written as CSV).

A series is one variant (``label``) on one ``machine`` at one ``config`` (dtype, batch, heads,
key/value heads, head_dim, causal) and one ``pass``, over ``seq_len``. The functions take the
columns that make a group (``GROUP``; decode groups by ``kv`` instead of ``pass``) and return
an empty frame, never raise, when the data is not there.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from .load import Run, most_common, samples

GROUP = ["machine", "config", "pass"]
SERIES = GROUP + ["label"]
FIT_POINTS = 4  # growth exponents fit the largest lengths, where the asymptotic term dominates
KERNEL_PASSES = ("fwd", "fwd_bwd")


def num(value, fmt="{:g}") -> str:
    return "?" if pd.isna(value) else fmt.format(value)


def short_n(n: float) -> str:
    """1024 -> 1k, 1536 -> 1536: lengths as a reader says them."""
    return f"{n / 1024:g}k" if n >= 1024 and n % 1024 == 0 else f"{n:.0f}"


def config_label(df: pd.DataFrame, kv: bool = True) -> pd.Series:
    """``float32 B1 H8 d64`` (``H8/KV2`` with grouped heads, `` causal``): what a series holds
    fixed besides n. ``kv=False`` leaves the key/value heads out (decode facets by them)."""
    if df.empty:
        return pd.Series([], dtype=str, index=df.index)
    grouped = df["kv_heads"].notna() & (df["kv_heads"] != df["heads"])
    kv_text = ("/KV" + df["kv_heads"].map(lambda x: num(x, "{:.0f}"))).where(grouped & kv, "")
    parts = [
        df["dtype"].replace("", "?"),
        " B" + df["batch"].map(lambda x: num(x, "{:.0f}")),
        " H" + df["heads"].map(lambda x: num(x, "{:.0f}")),
        kv_text,
        " d" + df["head_dim"].map(lambda x: num(x, "{:.0f}")),
        df["causal"].map(lambda c: " causal" if c else "").where(df["pass"] != "decode", ""),
    ]
    return parts[0].str.cat(parts[1:])


def ok_speed(rows: pd.DataFrame, passes) -> pd.DataFrame:
    df = rows[(rows["kind"] == "speed") & (rows["status"] == "ok") & rows["pass"].isin(passes)]
    return df[df["latency_ms"].notna() & (df["latency_ms"] > 0) & df["seq_len"].notna()].copy()


def speed_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """The ok fwd and fwd_bwd rows with their config, IQR band and throughput filled in."""
    df = ok_speed(rows, KERNEL_PASSES)
    df["config"] = config_label(df)
    df = with_band(df)
    missing = df["gflops_per_s"].isna()
    df.loc[missing, "gflops_per_s"] = df["flops"] / (df["latency_ms"] * 1e6)
    return df.sort_values(SERIES + ["seq_len"]).reset_index(drop=True)


def with_band(df: pd.DataFrame) -> pd.DataFrame:
    bands = [
        _band(s, m, i)
        for s, m, i in zip(df["samples_ms"], df["latency_ms"], df["latency_iqr_ms"], strict=True)
    ]
    return df.assign(lat_lo=[b[0] for b in bands], lat_hi=[b[1] for b in bands])


def _band(text, median, iqr) -> tuple[float, float]:
    """Quartiles of the raw samples; without them median -/+ IQR/2 (clipped above 0)."""
    raw = samples(text)
    if len(raw) >= 2:
        q1, q3 = np.percentile(raw, [25, 75])
        return float(q1), float(q3)
    half = 0.0 if pd.isna(iqr) else iqr / 2
    return max(median - half, median * 1e-3), median + half


def main_config(cells: pd.DataFrame) -> str:
    """The config with the most cells (non-causal first on a tie): the one a summary uses."""
    if cells.empty:
        return ""
    counts = cells.groupby("config").size().reset_index(name="n")
    counts["causal"] = counts["config"].str.endswith("causal")
    return counts.sort_values(["n", "causal"], ascending=[False, True]).iloc[0]["config"]


def ratio_to(cells: pd.DataFrame, reference: str, col: str, group=GROUP, invert=True):
    """Each cell's ``col`` against the reference variant's at the same group and length:
    reference / cell when ``invert`` (a speed-up from times), else cell / reference."""
    out = series_of(group) + ["variant", "seq_len", col, "ref", "ratio"]
    ref = cells[(cells["variant"] == reference) & cells[col].notna() & (cells[col] > 0)]
    if cells.empty or ref.empty:
        return pd.DataFrame(columns=out)
    ref = ref.groupby(group + ["seq_len"], as_index=False)[col].min()
    df = cells.merge(ref.rename(columns={col: "ref"}), on=group + ["seq_len"])
    df["ratio"] = df["ref"] / df[col] if invert else df[col] / df["ref"]
    return df[out]


def series_of(group) -> list[str]:
    return list(group) + ["label"]


def speedup(cells: pd.DataFrame, reference: str, group=GROUP) -> pd.DataFrame:
    """Reference latency / variant latency on the same group and length."""
    sp = ratio_to(cells, reference, "latency_ms", group)
    return sp.rename(columns={"ref": "ref_ms", "ratio": "speedup"})


def exponents(cells: pd.DataFrame, metrics, group=GROUP, fit_points=FIT_POINTS):
    """Slope of log(metric) against log(n) over the largest ``fit_points`` lengths of each
    series, with its standard error (scipy's linregress). ``metrics``: (name, column)."""
    series = series_of(group)
    out = []
    for key, s in cells.groupby(series, sort=True):
        for metric, col in metrics:
            base = dict(zip(series, key, strict=True)) | {"metric": metric}
            out.append(base | fit(s, col, fit_points))
    cols = series + ["metric", "exponent", "stderr", "r2", "points", "fit_range", "note"]
    return pd.DataFrame(out, columns=cols)


def fit(series: pd.DataFrame, col: str, fit_points: int = FIT_POINTS) -> dict:
    pts = series[series[col] > 0].groupby("seq_len")[col].median().sort_index().tail(fit_points)
    res = {"exponent": math.nan, "stderr": math.nan, "r2": math.nan, "points": len(pts)}
    if len(pts):
        res["fit_range"] = f"n = {pts.index[0]:.0f} .. {pts.index[-1]:.0f}"
    if len(pts) < 2:
        return res | {"note": "needs at least 2 lengths with data"}
    if np.ptp(np.log(pts.to_numpy(float))) == 0:  # a constant (a bounded state): slope 0 exactly
        return res | {"exponent": 0.0, "stderr": 0.0, "r2": 1.0, "note": "constant"}
    fitted = stats.linregress(np.log(pts.index.to_numpy(float)), np.log(pts.to_numpy(float)))
    res |= {"exponent": fitted.slope, "r2": fitted.rvalue**2}
    if len(pts) < 3:  # two points fit exactly: no residual, no uncertainty
        return res | {"note": "2 lengths: no uncertainty"}
    return res | {"stderr": fitted.stderr, "note": ""}


def slope_text(exponent, stderr, note="") -> str:
    if pd.isna(exponent):
        return note
    err = "" if pd.isna(stderr) or note == "constant" else f" +/- {stderr:.2f}"
    return f"{exponent:.2f}".replace("-0.00", "0.00") + err


def crossovers(cells: pd.DataFrame, reference: str, group=GROUP) -> pd.DataFrame:
    """Where each variant becomes faster than the reference, interpolated on log-log axes."""
    series = series_of(group)
    sp = speedup(cells, reference, group)
    sp = sp[sp["variant"] != reference]
    out = []
    for key, s in sp.groupby(series, sort=True):
        s = s.groupby("seq_len")["speedup"].median().sort_index()
        n_cross, text = crossing(s.index.to_numpy(float), np.log(s.to_numpy(float)))
        out.append(dict(zip(series, key, strict=True)) | {"crossover_n": n_cross, "verdict": text})
    return pd.DataFrame(out, columns=series + ["crossover_n", "verdict"])


def crossing(n: np.ndarray, log_speedup: np.ndarray) -> tuple[float, str]:
    """``log_speedup`` > 0 means faster than the reference. The crossing reported is the last
    slower-to-faster change, after which the variant stays faster to the largest length."""
    span = f"n = {n[0]:.0f} .. {n[-1]:.0f}"
    if log_speedup[-1] <= 0:
        return math.nan, f"not within the measured range ({span})"
    if (log_speedup > 0).all():
        return math.nan, f"faster at every measured length ({span})"
    i = int(np.flatnonzero(log_speedup <= 0)[-1])  # last slower point; i + 1 is faster
    a, b = log_speedup[i], log_speedup[i + 1]
    t = -a / (b - a) if b != a else 0.0
    n_cross = float(np.exp(np.log(n[i]) + t * (np.log(n[i + 1]) - np.log(n[i]))))
    return n_cross, f"~{n_cross:,.0f} (between {n[i]:.0f} and {n[i + 1]:.0f})"


# --- failures and peaks ---------------------------------------------------------------------------
def failures(rows: pd.DataFrame) -> pd.DataFrame:
    """Every non-ok row, grouped so that one reason over many lengths is one line."""
    df = rows[rows["status"] != "ok"].copy()
    cols = ["run", "machine", "kind", "label", "task", "pass", "config", "status", "reason"]
    if df.empty:
        return pd.DataFrame(columns=cols + ["seq_lens", "cells"])
    df["config"] = config_label(df).where(df["kind"] == "speed", df["dtype"])
    df["n"] = df["seq_len"].map(lambda x: num(x, "{:.0f}"))
    g = df.groupby(cols, dropna=False, sort=True)
    out = g["n"].agg(lambda ns: " ".join(sorted(set(ns), key=_len_key))).rename("seq_lens")
    return out.to_frame().join(g.size().rename("cells")).reset_index()


def _len_key(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf


def matmul_peaks(runs: list[Run], rows: pd.DataFrame) -> list[tuple[str, str, float]]:
    """(machine, dtype or "", GFLOP/s) for every measured matmul peak (a dict: one per dtype)."""
    out = []
    for run in runs:
        machine = most_common(rows.loc[rows["run_dir"] == str(run.path), "machine"])
        for what, value in flat_peak(run.meta.get("matmul_peak_gflops")):
            if machine:
                out.append((machine, what, value))
    return list(dict.fromkeys(out))


def flat_peak(peak, prefix="") -> list[tuple[str, float]]:
    if isinstance(peak, dict):
        return [x for k, v in peak.items() for x in flat_peak(v, f"{prefix}{k} ")]
    try:
        value = float(peak)
    except (TypeError, ValueError):
        return []
    return [(prefix.strip(), value)] if math.isfinite(value) and value > 0 else []


def format_peak(peak) -> str:
    return ", ".join(f"{w + ': ' if w else ''}{v:,.1f}" for w, v in flat_peak(peak)) or "-"


def exponents_wide(exp: pd.DataFrame, group=("config", "label"), cols=("metric", "pass")):
    """One row per series: "slope +/- stderr" per metric and pass, with the fit range."""
    text = [
        slope_text(e, s, n)
        for e, s, n in zip(exp["exponent"], exp["stderr"], exp["note"], strict=True)
    ]
    df = exp.assign(text=text, col=exp[list(cols)].astype(str).agg(" ".join, axis=1))
    wide = df.pivot_table(index=list(group), columns="col", values="text", aggfunc="first")
    wide["fit range"] = df.groupby(list(group))["fit_range"].first()
    wide.columns.name = None
    return wide.reset_index()

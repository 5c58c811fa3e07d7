"""The numbers behind each report section, as plain DataFrames (also written as CSV).

A speed series is one variant (``label``) in one ``source`` at one ``config`` (dtype, batch,
heads, head_dim, causal) and one ``pass``, over ``seq_len``; every function below works on
those series and returns an empty frame, never raises, when the data is not there.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from .load import Run, most_common, samples

SERIES = ["source", "config", "pass", "label"]
GROUP = ["source", "config", "pass"]
FIT_POINTS = 4  # growth exponents fit the largest lengths, where the asymptotic term dominates


def _num(value, fmt="{:g}") -> str:
    return "?" if pd.isna(value) else fmt.format(value)


def config_label(df: pd.DataFrame) -> pd.Series:
    """``float32 B1 H8 d64`` (plus `` causal``): what a speed series holds fixed besides n."""
    if df.empty:
        return pd.Series([], dtype=str, index=df.index)
    parts = [
        df["dtype"].replace("", "?"),
        " B" + df["batch"].map(lambda x: _num(x, "{:.0f}")),
        " H" + df["heads"].map(lambda x: _num(x, "{:.0f}")),
        " d" + df["head_dim"].map(lambda x: _num(x, "{:.0f}")),
        df["causal"].map(lambda c: " causal" if c else ""),
    ]
    return parts[0].str.cat(parts[1:])


def speed_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """The ok speed rows with their config, IQR band and throughput filled in."""
    df = rows[(rows["kind"] == "speed") & (rows["status"] == "ok")].copy()
    df = df[df["latency_ms"].notna() & (df["latency_ms"] > 0) & df["seq_len"].notna()]
    df["config"] = config_label(df)
    bands = [
        _band(s, m, i)
        for s, m, i in zip(df["samples_ms"], df["latency_ms"], df["latency_iqr_ms"], strict=True)
    ]
    df["lat_lo"] = [b[0] for b in bands]
    df["lat_hi"] = [b[1] for b in bands]
    missing = df["gflops_per_s"].isna()
    df.loc[missing, "gflops_per_s"] = df["flops"] / (df["latency_ms"] * 1e6)
    return df.sort_values(SERIES + ["seq_len"]).reset_index(drop=True)


def _band(text, median, iqr) -> tuple[float, float]:
    """Quartiles of the raw samples; without them median -/+ IQR/2 (clipped above 0)."""
    raw = samples(text)
    if len(raw) >= 2:
        q1, q3 = np.percentile(raw, [25, 75])
        return float(q1), float(q3)
    half = 0.0 if pd.isna(iqr) else iqr / 2
    return max(median - half, median * 1e-3), median + half


def speedup(cells: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Reference latency / variant latency on the same source, config, pass and length."""
    ref = cells[cells["variant"] == reference]
    if cells.empty or ref.empty:
        return pd.DataFrame(
            columns=SERIES + ["variant", "seq_len", "latency_ms", "ref_ms", "speedup"]
        )
    ref = ref.groupby(GROUP + ["seq_len"], as_index=False)["latency_ms"].min()
    df = cells.merge(ref.rename(columns={"latency_ms": "ref_ms"}), on=GROUP + ["seq_len"])
    df["speedup"] = df["ref_ms"] / df["latency_ms"]
    return df[SERIES + ["variant", "seq_len", "latency_ms", "ref_ms", "speedup"]]


def exponents(cells: pd.DataFrame, fit_points: int = FIT_POINTS) -> pd.DataFrame:
    """Slope of log(time) and log(memory) against log(n) over the largest ``fit_points``
    lengths, with its standard error (scipy's linregress)."""
    out = []
    metrics = (("time", "latency_ms"), ("memory", "peak_mem_mb"))
    for key, series in cells.groupby(SERIES, sort=True):
        for metric, col in metrics:
            out.append(
                dict(zip(SERIES, key, strict=True))
                | {"metric": metric}
                | _fit(series, col, fit_points)
            )
    cols = SERIES + ["metric", "exponent", "stderr", "r2", "points", "fit_range", "note"]
    return pd.DataFrame(out, columns=cols)


def _fit(series: pd.DataFrame, col: str, fit_points: int) -> dict:
    pts = series[series[col] > 0].groupby("seq_len")[col].median().sort_index().tail(fit_points)
    res = {"exponent": math.nan, "stderr": math.nan, "r2": math.nan, "points": len(pts)}
    if len(pts):
        res["fit_range"] = f"n = {pts.index[0]:.0f} .. {pts.index[-1]:.0f}"
    if len(pts) < 2:
        return res | {"note": "needs at least 2 lengths with data"}
    fit = stats.linregress(np.log(pts.index.to_numpy(float)), np.log(pts.to_numpy(float)))
    res |= {"exponent": fit.slope, "r2": fit.rvalue**2}
    if len(pts) < 3:  # two points fit exactly: no residual, no uncertainty
        return res | {"note": "2 lengths: no uncertainty"}
    return res | {"stderr": fit.stderr, "note": ""}


def crossovers(cells: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Where each variant becomes faster than the reference, interpolated on log-log axes."""
    sp = speedup(cells, reference)
    sp = sp[sp["variant"] != reference]
    out = []
    for key, s in sp.groupby(SERIES, sort=True):
        s = s.groupby("seq_len")["speedup"].median().sort_index()
        n_cross, text = _crossing(s.index.to_numpy(float), np.log(s.to_numpy(float)))
        out.append(dict(zip(SERIES, key, strict=True)) | {"crossover_n": n_cross, "verdict": text})
    return pd.DataFrame(out, columns=SERIES + ["crossover_n", "verdict"])


def _crossing(n: np.ndarray, log_speedup: np.ndarray) -> tuple[float, str]:
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


# --- accuracy ---------------------------------------------------------------------------------
def accuracy(rows: pd.DataFrame) -> pd.DataFrame:
    """Test accuracy per source, task, length and variant: mean and spread over seeds."""
    df = rows[(rows["kind"] == "accuracy") & (rows["status"] == "ok") & rows["accuracy"].notna()]
    cols = ["source", "task", "seq_len", "label", "variant", "dtype"]
    if df.empty:
        return pd.DataFrame(columns=cols + ["accuracy", "accuracy_std", "seeds"])
    scale = 100.0 if df["accuracy"].max() <= 1.0 else 1.0  # fractions shown as percent
    df = df.assign(accuracy=df["accuracy"] * scale)
    g = df.groupby(cols, dropna=False)["accuracy"]
    out = g.agg(accuracy="mean", accuracy_std="std", seeds="count").reset_index()
    return out


def approx(rows: pd.DataFrame) -> pd.DataFrame:
    """Relative error of each variant's output against ``full`` on the same inputs."""
    df = rows[(rows["kind"] == "approx") & (rows["status"] == "ok") & rows["approx_error"].notna()]
    cols = ["source", "label", "input", "seq_len"]
    if df.empty:
        return pd.DataFrame(columns=cols + ["approx_error"])
    return df.groupby(cols, dropna=False)["approx_error"].mean().reset_index()


def accuracy_speed(acc: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Each accuracy point joined with the speed of the same variant at the task's length (or
    the nearest measured one): fwd_bwd preferred (training runs it), the same dtype preferred."""
    out = []
    for _, a in acc.iterrows():
        match = _speed_for(a, cells)
        if match is not None:
            out.append(a.to_dict() | match)
    cols = list(acc.columns) + [
        "speed_n",
        "speed_pass",
        "speed_config",
        "latency_ms",
        "calls_per_s",
        "peak_mem_mb",
    ]
    return pd.DataFrame(out, columns=cols)


def _speed_for(a: pd.Series, cells: pd.DataFrame) -> dict | None:
    c = cells[(cells["source"] == a["source"]) & (cells["label"] == a["label"])]
    if c.empty:
        c = cells[(cells["source"] == a["source"]) & (cells["variant"] == a["variant"])]
    if c.empty:
        return None
    c = c[c["pass"] == ("fwd_bwd" if (c["pass"] == "fwd_bwd").any() else c["pass"].iloc[0])]
    if (c["dtype"] == a["dtype"]).any():
        c = c[c["dtype"] == a["dtype"]]
    c = c[c["config"] == most_common(c["config"])]
    target = a["seq_len"] if pd.notna(a["seq_len"]) else c["seq_len"].max()
    best = c.iloc[int(np.argmin(np.abs(np.log(c["seq_len"].to_numpy(float) / target))))]
    return {
        "speed_n": best["seq_len"],
        "speed_pass": best["pass"],
        "speed_config": best["config"],
        "latency_ms": best["latency_ms"],
        "calls_per_s": 1000.0 / best["latency_ms"],
        "peak_mem_mb": best["peak_mem_mb"],
    }


# --- failures, runs, provenance --------------------------------------------------------------
def failures(rows: pd.DataFrame) -> pd.DataFrame:
    """Every non-ok row, grouped so that one reason over many lengths is one line."""
    df = rows[rows["status"] != "ok"].copy()
    cols = ["source", "kind", "label", "task", "pass", "config", "status", "reason"]
    if df.empty:
        return pd.DataFrame(columns=cols + ["seq_lens", "cells"])
    df["config"] = config_label(df).where(df["kind"] == "speed", df["dtype"])
    df["n"] = df["seq_len"].map(lambda x: _num(x, "{:.0f}"))
    g = df.groupby(cols, dropna=False, sort=True)
    out = g["n"].agg(lambda ns: " ".join(sorted(set(ns), key=_len_key))).rename("seq_lens")
    return out.to_frame().join(g.size().rename("cells")).reset_index()


def _len_key(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf


def runs_table(runs: list[Run], rows: pd.DataFrame) -> pd.DataFrame:
    out = []
    for run in runs:
        mine = rows[rows["run_dir"] == str(run.path)]
        out.append(
            {
                "run": run.name,
                "folder": str(run.path),
                "sources": ", ".join(sorted(set(mine["source"]))) or "-",
                "status": run.status,
                "rows": len(mine),
                "ok_rows": int((mine["status"] == "ok").sum()),
                "detail": run.reason,
            }
        )
    return pd.DataFrame(
        out, columns=["run", "folder", "sources", "status", "rows", "ok_rows", "detail"]
    )


PROVENANCE_FIELDS = ["run_id", "git_commit", "torch_version", "threads", "cpu", "gpu"]


def provenance(runs: list[Run], rows: pd.DataFrame) -> pd.DataFrame:
    """One row per run: where its numbers came from (rows first, meta.json where rows lack it)."""
    out = []
    for run in runs:
        mine = rows[rows["run_dir"] == str(run.path)]
        rec = {"run": run.name, "status": run.status}
        for col in PROVENANCE_FIELDS:
            vals = sorted({_plain(v) for v in mine[col] if str(v) not in ("", "nan")})
            rec[col] = ", ".join(vals) or str(run.meta.get(col, "") or "")
        rec["devices"] = ", ".join(sorted(set(mine["device"]) - {""}))
        rec["dtypes"] = ", ".join(sorted(set(mine["dtype"]) - {""}))
        stamps = sorted(str(v) for v in mine["timestamp"] if str(v) not in ("", "nan"))
        rec["timestamps"] = (
            f"{stamps[0]} .. {stamps[-1]}" if stamps else str(run.meta.get("timestamp", ""))
        )
        rec["matmul_peak_gflops"] = format_peak(run.meta.get("matmul_peak_gflops"))
        out.append(rec)
    return pd.DataFrame(out)


def _plain(value) -> str:
    """2.0 -> "2" (numeric columns are read as floats), text unchanged."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def matmul_peaks(runs: list[Run], rows: pd.DataFrame) -> list[tuple[str, str, float]]:
    """(source, what, GFLOP/s) for every measured matmul peak; a dict peak gives one per key."""
    out = []
    for run in runs:
        sources = sorted(set(rows.loc[rows["run_dir"] == str(run.path), "source"]))
        for what, value in _flat_peak(run.meta.get("matmul_peak_gflops")):
            for source in sources:
                out.append((source, what, value))
    return out


def _flat_peak(peak, prefix="") -> list[tuple[str, float]]:
    if isinstance(peak, dict):
        return [x for k, v in peak.items() for x in _flat_peak(v, f"{prefix}{k} ")]
    try:
        value = float(peak)
    except (TypeError, ValueError):
        return []
    return [(prefix.strip(), value)] if math.isfinite(value) and value > 0 else []


def format_peak(peak) -> str:
    return ", ".join(f"{w + ': ' if w else ''}{v:,.1f}" for w, v in _flat_peak(peak)) or "-"

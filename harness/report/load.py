"""The report's view of the rows. Run folders are read by :mod:`harness.results` (the one reader
of run folders); here each row gets what a reader sees: its ``machine``, its ``run`` (the run
id) and its variant ``label``, and a measurement repeated by a later run on the same machine
is replaced by the later one (listed under the runs, never silently dropped)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.results import Run, compact_options, row_key, samples
from harness.results import load as load_rows

from .groups import group_of

__all__ = ["Data", "Run", "compact_options", "load", "most_common", "samples"]


@dataclass
class Data:
    runs: list[Run]
    rows: pd.DataFrame  # the current rows: one per key and machine
    replaced: pd.DataFrame  # rows a later run measured again, with ``by``: the run that did


def load(paths: list[Path]) -> Data:
    runs, rows = load_rows(paths)
    rows["run"] = rows["run_name"].astype(str)
    rows["row_order"] = range(len(rows))  # "first measured" where option sets are matched
    rows["machine"] = machine_labels(rows)
    current, replaced = latest(rows, runs)
    current = current.assign(label=variant_labels(current))
    declared = declared_groups(runs)
    current["group"] = [group_of(v, declared) for v in current["variant"]]
    return Data(runs, current.reset_index(drop=True), replaced)


def machine_labels(rows: pd.DataFrame) -> pd.Series:
    """``cpu: AMD EPYC, 2 threads`` or ``cuda: NVIDIA H200``: what a leaderboard is per."""
    if rows.empty:
        return pd.Series([], dtype=str, index=rows.index)
    kind = rows["device"].astype(str).str.split(":").str[0].replace("", "?")
    gpu = rows["gpu"].astype(str).replace("nan", "")
    cpu = rows["cpu"].astype(str).replace("nan", "")
    hardware = gpu.where((kind != "cpu") & (gpu != ""), cpu).replace("", "?")
    threads = rows["threads"].map(lambda t: "" if pd.isna(t) else f", {t:.0f} threads")
    return kind + ": " + hardware + threads.where(kind == "cpu", "")


def latest(rows: pd.DataFrame, runs: list[Run]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per (machine, key): the newest ok row (by its timestamp, then by run order),
    else the newest row; the others are returned as replaced, with ``by``."""
    if rows.empty:
        return rows, rows.assign(by=pd.Series(dtype=str))
    order = {str(r.path): i for i, r in enumerate(runs)}
    df = rows.assign(
        _key=[row_key(r) for r in rows.to_dict("records")],
        _ok=rows["status"] == "ok",
        _run_order=rows["run_dir"].map(order),
    )
    df["_key"] = df["machine"] + "|" + df["_key"].map(str)
    df = df.sort_values(["_ok", "timestamp", "_run_order"], kind="stable")
    keep = ~df.duplicated("_key", keep="last")
    winner = df[keep].set_index("_key")["run"]
    replaced = df[~keep].assign(by=lambda d: d["_key"].map(winner))
    helpers = ["_key", "_ok", "_run_order"]
    current = df[keep].sort_index().drop(columns=helpers)
    return current, replaced.drop(columns=helpers)


def variant_labels(rows: pd.DataFrame) -> pd.Series:
    """The variant name, plus the options that tell its option sets apart where one variant
    was measured with several in rows of the same kind and task: ``sparse[pattern=bigbird]``."""
    if rows.empty:
        return pd.Series([], dtype=str, index=rows.index)
    labels = rows["variant"].astype(str).copy()
    for _, group in rows.groupby(["kind", "task", "variant"]):
        parsed = {text: _as_dict(text) for text in group["options"].astype(str).unique()}
        if len(parsed) < 2:
            continue
        keys = sorted({k for d in parsed.values() for k in d})
        differ = [k for k in keys if len({json.dumps(d.get(k)) for d in parsed.values()}) > 1]
        for text, d in parsed.items():
            shown = ",".join(f"{k}={d.get(k)}" for k in differ) or compact_options(text)
            at = group.index[group["options"].astype(str) == text]
            labels.loc[at] = group.loc[at, "variant"] + "[" + shown + "]"
    return labels


def declared_groups(runs: list[Run]) -> dict:
    """{variant: group} where a run's meta.json declares it (``variants: [{name, group}]``)."""
    out = {}
    for run in runs:
        for entry in run.meta.get("variants") or []:
            if isinstance(entry, dict) and entry.get("group"):
                out[str(entry.get("name"))] = str(entry["group"])
    return out


def _as_dict(text: str) -> dict:
    try:
        parsed = json.loads(text)
    except ValueError:
        return {"options": text}
    return parsed if isinstance(parsed, dict) else {"options": text}


def options_dict(text) -> dict:
    parsed = _as_dict(str(text))
    return {} if set(parsed) == {"options"} else parsed


def most_common(values) -> str:
    counts = Counter(v for v in values if str(v) != "")
    return counts.most_common(1)[0][0] if counts else ""

"""Read results folders into one tidy frame, each row labelled with its ``source``.

Pure pandas (no plotting) so that ``harness.compare`` can use it without importing matplotlib.
A folder that cannot be read is not an error here: it becomes a :class:`Run` whose status says
why, so the report can show it as failed instead of crashing.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness import schema

NUMERIC = [
    "batch", "heads", "seq_len", "head_dim", "latency_ms", "latency_iqr_ms", "peak_mem_mb",
    "model_mem_mb", "flops", "counted_flops", "gflops_per_s", "compile_s", "accuracy", "steps",
    "train_s", "params", "seed", "approx_error", "threads",
]  # fmt: skip
BOOLEAN = ["causal", "noisy"]
# meta.json "status" values that mean the run finished normally.
GOOD_META = {"", "ok", "done", "complete", "completed", "finished", "success", "succeeded"}


@dataclass
class Run:
    """One results folder as read: its rows, its meta.json and whether it finished."""

    path: Path
    rows: pd.DataFrame
    meta: dict = field(default_factory=dict)
    status: str = "ok"  # ok | partial (some cells not ok) | interrupted | failed
    reason: str = ""

    @property
    def name(self) -> str:
        return str(self.meta.get("run_id") or self.path.name)


def find_run_dirs(path: Path) -> list[Path]:
    """The run folders under ``path``: itself when it holds a results.csv, else the folders below
    it that hold one (a Hydra multirun folder holds one run per job, some of them maybe failed)."""
    path = Path(path)
    if path.is_file():  # a results.csv named directly
        return [path.parent]
    if (path / "results.csv").is_file() or not path.is_dir():
        return [path]
    below = {p.parent for p in path.rglob("*") if p.name in _MARKERS and p.is_file()}
    below.discard(path)
    return sorted(below) + ([path] if (path / "FAILED").is_file() else []) or [path]


_MARKERS = ("results.csv", "meta.json", "FAILED")


def read_run(path: Path) -> Run:
    """One run folder; never raises on a missing or broken file (the status says what broke)."""
    path = Path(path)
    meta, meta_err = _read_meta(path / "meta.json")
    rows, rows_err = _read_rows(path / "results.csv")
    run = Run(path=path, rows=rows, meta=meta)
    run.status, run.reason = _run_status(path, meta, rows, meta_err or rows_err)
    return run


def _read_meta(path: Path) -> tuple[dict, str]:
    if not path.is_file():
        return {}, ""
    try:
        meta = json.loads(path.read_text())
        return (meta if isinstance(meta, dict) else {"meta": meta}), ""
    except (OSError, ValueError) as e:
        return {}, f"meta.json unreadable: {e}"


def _read_rows(path: Path) -> tuple[pd.DataFrame, str]:
    if not path.is_file():
        return empty_frame(), "no results.csv"
    try:
        # Everything as text first: exact metrics (flops) must not pass through float64.
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        return empty_frame(), f"results.csv unreadable: {e}"
    return normalise(raw), ""


def empty_frame() -> pd.DataFrame:
    return normalise(pd.DataFrame(columns=schema.COLUMNS))


def normalise(raw: pd.DataFrame) -> pd.DataFrame:
    """Every schema column present; numbers as floats, flags as bools, text stripped.

    The raw text of the exact metrics is kept in ``<col>_text`` for exact comparison."""
    df = raw.copy()
    for col in schema.COLUMNS:
        if col not in df:
            df[col] = ""
    df = df.fillna("")
    if (df["kind"] == "").all():  # an older file without the kind column: speed rows
        df["kind"] = "speed"
    for col in ("flops", "counted_flops", "peak_mem_mb"):
        df[f"{col}_text"] = df[col].astype(str).str.strip()
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    for col in BOOLEAN:
        df[col] = df[col].map(_to_bool)
    for col in ("variant", "options", "device", "dtype", "pass", "status", "task", "input"):
        df[col] = df[col].astype(str).str.strip()
    df["status"] = df["status"].replace("", "ok").str.lower()
    return df


def _to_bool(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _run_status(path: Path, meta: dict, rows: pd.DataFrame, read_error: str) -> tuple[str, str]:
    """failed: a FAILED marker, a failing meta status, nothing readable, or no ok row at all."""
    marker = path / "FAILED"
    if marker.is_file():
        text = marker.read_text(errors="replace").strip()
        return "failed", "FAILED marker" + (f": {text.splitlines()[0][:300]}" if text else "")
    meta_status = str(meta.get("status", "")).strip().lower()
    if meta_status not in GOOD_META:
        detail = meta.get("error") or meta.get("reason") or ""
        return "failed", f"meta.json status {meta_status!r}" + (f": {detail}" if detail else "")
    if read_error:
        return "failed", read_error
    if rows.empty:
        return "failed", "results.csv has no rows"
    bad = rows["status"] != "ok"
    if bad.all():
        return "failed", f"no ok rows ({_status_counts(rows)})"
    if meta.get("interrupted"):  # the sweep was stopped: what it finished is kept and shown
        return "interrupted", f"interrupted {meta['interrupted']}; {_status_counts(rows)}"
    if bad.any():
        return "partial", _status_counts(rows)
    return "ok", ""


def _status_counts(rows: pd.DataFrame) -> str:
    counts = rows["status"].value_counts()
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def load(paths: list[Path]) -> tuple[list[Run], pd.DataFrame]:
    """All runs under ``paths`` and their rows in one frame with ``source`` and ``label``."""
    runs = [read_run(d) for p in paths for d in find_run_dirs(Path(p))]
    frames = []
    for run in runs:
        df = run.rows.copy()
        df["run_dir"] = str(run.path)
        df["run_name"] = run.name
        for col in ("git_commit", "run_id", "torch_version", "cpu", "gpu"):  # fill from meta
            df[col] = df[col].where(df[col].astype(str) != "", str(run.meta.get(col, "") or ""))
        frames.append(df)
    rows = pd.concat(frames, ignore_index=True) if frames else empty_frame()
    rows["source"] = source_labels(rows)
    rows["label"] = variant_labels(rows)
    return runs, rows


def source_labels(rows: pd.DataFrame) -> pd.Series:
    """``device@commit7`` (``+dirty``: uncommitted changes); a run id is added only where two
    runs share device and commit."""
    if rows.empty:
        return pd.Series([], dtype=str, index=rows.index)
    device = rows["device"].replace("", "?")
    commit = rows["git_commit"].astype(str)
    dirty = commit.str.endswith("+dirty").map({True: "+dirty", False: ""})
    base = device + "@" + (commit.str[:7] + dirty).replace("", "?")
    runs_per_label = rows.groupby(base)["run_dir"].nunique()
    shared = base.map(runs_per_label) > 1
    return base.where(~shared, base + " #" + rows["run_name"])


def variant_labels(rows: pd.DataFrame) -> pd.Series:
    """The variant name, plus the options that tell its option sets apart where one variant
    was measured with several in rows of the same kind: ``sparse[pattern=bigbird]``."""
    if rows.empty:
        return pd.Series([], dtype=str, index=rows.index)
    labels = rows["variant"].astype(str).copy()
    for _, group in rows.groupby(["kind", "variant"]):
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


def _as_dict(text: str) -> dict:
    try:
        parsed = json.loads(text)
    except ValueError:
        return {"options": text}
    return parsed if isinstance(parsed, dict) else {"options": text}


def compact_options(options: str) -> str:
    """``{"seed": 0, "window": 64}`` (the sweep writes sorted JSON) as ``seed=0,window=64``."""
    text = str(options).strip()
    if text in ("", "{}", "None", "nan"):
        return ""
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    if not isinstance(parsed, dict):
        return text
    return ",".join(f"{k}={v}" for k, v in parsed.items())


def samples(text) -> list[float]:
    """The raw per-block times of one cell (``samples_ms`` is space separated)."""
    out = []
    for tok in str(text or "").replace(",", " ").split():
        try:
            out.append(float(tok))
        except ValueError:
            continue
    return out


def most_common(values) -> str:
    counts = Counter(v for v in values if str(v) != "")
    return counts.most_common(1)[0][0] if counts else ""

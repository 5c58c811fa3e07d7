"""The one reader and writer of run folders: ``<results_dir>/<run_id>/``.

A run folder holds ``results.csv`` (one row per measurement, header :data:`schema.COLUMNS`,
rows appended and flushed as each finishes), ``meta.json`` (where the numbers came from, and
whether the run finished), a ``.lock`` while a sweep writes it, and ``FAILED`` when a job of a
multirun failed. The sweep, the tasks, ``harness.compare``, the report and the scripts all go
through this module; nothing else opens those files.

Guarantees:
- a line without its trailing newline (a write cut by a kill) is never a row: writers cut it
  off before appending, readers ignore it; an empty file gets its header;
- one key per kind of row (:data:`schema.ROW_KEYS`), compared as text everywhere;
- ``sweep.rounds`` writes one row per round; :func:`pool` merges a key's rounds on reading, so an
  interrupt loses at most the round in progress and a later failure never replaces good samples;
- :class:`RunLock` holds the folder while a sweep writes it; a second writer is refused at once;
- a run whose meta.json has no ``finished`` stamp reads as interrupted.

Pure Python and pandas: reading never imports torch or the variants.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import schema

REPO = Path(__file__).resolve().parent.parent
RESULTS = "results.csv"
META = "meta.json"
LOCK = ".lock"
FAILED = "FAILED"
NOISY = 0.10  # IQR / median above this flags a cell `noisy`
# meta.json "status" values that mean the run finished normally (a launcher may write one).
GOOD_META = {"", "ok", "done", "complete", "completed", "finished", "success", "succeeded"}


# --- keys ---------------------------------------------------------------------------------------
def key_text(value) -> str:
    """A key column's value as the text it is written as, so a key made in memory equals the
    same key read back from the CSV."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() else f"{value:.6g}"
    if isinstance(value, dict | list):  # options and model sizes, as the same sorted JSON
        return json.dumps(value, sort_keys=True)
    return str(value)


def row_key(row: dict) -> tuple:
    """(kind, *key columns) of a row, as text (see schema.ROW_KEYS)."""
    kind = row.get("kind") or "speed"
    return (kind, *(key_text(row.get(c)) for c in schema.ROW_KEYS[kind]))


# --- statistics of timed samples -----------------------------------------------------------------
def summarize(samples_s: list[float]) -> dict:
    """Median and IQR in ms of per-block times given in seconds, the raw samples, the noise flag."""
    ms = [s * 1e3 for s in samples_s]
    median = statistics.median(ms)
    iqr = 0.0
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
        iqr = q3 - q1
    return {
        "latency_ms": median,
        "latency_iqr_ms": iqr,
        "noisy": bool(median > 0 and iqr / median > NOISY),
        "samples_ms": " ".join(f"{x:.6g}" for x in ms),
    }


def samples(text) -> list[float]:
    """The raw per-block times of one row (``samples_ms`` is space separated)."""
    out = []
    for tok in str(text or "").replace(",", " ").split():
        try:
            out.append(float(tok))
        except ValueError:
            continue
    return out


# --- writing ------------------------------------------------------------------------------------
class ResultsFile:
    """``results.csv`` of one run: made with its header, repaired after a kill, appended a row
    at a time (flushed and synced, so a row on disk is a whole row)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._repair()

    def _repair(self) -> None:
        """Cut a torn last line; write the header into a missing or empty file; rewrite an older
        file under today's header (its columns keep their values)."""
        data = self.path.read_bytes() if self.path.exists() else b""
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            self.path.write_bytes(data)
        if not data.strip():
            self._rewrite([])
            return
        header = next(csv.reader(io.StringIO(data.decode().splitlines()[0])))
        if header != schema.COLUMNS:
            self._rewrite(_parse(data.decode()))

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(schema.COLUMNS)
            for row in rows:
                w.writerow([row.get(c, "") for c in schema.COLUMNS])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def rows(self) -> list[dict]:
        return _parse(self.path.read_text()) if self.path.exists() else []

    def append(self, row: dict) -> None:
        unknown = set(row) - set(schema.COLUMNS)
        if unknown:
            raise KeyError(f"not results columns (see harness/schema.py): {sorted(unknown)}")
        if row.get("kind") not in schema.KINDS:
            raise KeyError(f"row kind {row.get('kind')!r} is not one of {schema.KINDS}")
        line = io.StringIO()
        csv.writer(line).writerow([_cell_text(row.get(c)) for c in schema.COLUMNS])
        try:
            with self.path.open("a", newline="") as f:
                f.write(line.getvalue())
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OSError(
                f"could not write a row to {self.path} ({e.strerror or e}); every row written "
                "before is kept: free space (or fix the folder), then resume the run"
            ) from e

    def done(self, kind: str, rounds: int = 1) -> set[tuple]:
        """Keys of ``kind`` that need no more measuring: every round measured, or a round that
        failed (a failed cell is not retried in later rounds)."""
        seen: dict[tuple, set] = {}
        finished: set[tuple] = set()
        for r in self.rows():
            if (r.get("kind") or "speed") != kind:
                continue
            key = row_key(r)
            if r.get("status", "ok") != "ok":
                finished.add(key)
            seen.setdefault(key, set()).add(r.get("round") or "0")
        return finished | {k for k, got in seen.items() if len(got) >= rounds}

    def done_rounds(self, kind: str = "speed") -> dict[tuple, set[int]]:
        """For each key, the rounds already written."""
        out: dict[tuple, set[int]] = {}
        for r in self.rows():
            if (r.get("kind") or "speed") == kind:
                out.setdefault(row_key(r), set()).add(int(r.get("round") or 0))
        return out


def _parse(text: str) -> list[dict]:
    """Rows of a results file; a last line without its newline is not a row."""
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    # csv refuses a field over 128 kB by default; no field is longer than its file (a run
    # written before time_fn kept at most MAX_BLOCKS samples can hold longer samples_ms)
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    return list(csv.DictReader(io.StringIO(text)))


def _cell_text(value) -> str:
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:.6g}" if not value.is_integer() or abs(value) >= 1e15 else str(int(value))
    return key_text(value)


# --- the lock -----------------------------------------------------------------------------------
class RunLocked(RuntimeError):
    """Another process is writing this run folder."""


PROBE_GRACE_S = 1.0  # locked() holds the lock for a moment: a sweep starting then waits it out


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock`` for as long as a sweep writes the folder.

    The kernel drops a flock when its holder dies, so a lock left by a killed sweep is taken
    over at once; the pid and command written into the file name the holder in the refusal."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock_within(fd, PROBE_GRACE_S):
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLocked(
                f"{self.path.parent} is being written by {holder}; wait for it to finish (or "
                "stop it), or write to another run_id"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({_command()})\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _flock_within(fd: int, seconds: float) -> bool:
    """Take the exclusive flock, trying again for ``seconds`` while another holds it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


def _command() -> str:
    try:
        return Path("/proc/self/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "python"


def locked(run_dir: Path) -> bool:
    """True while some process holds the run folder's lock."""
    path = Path(run_dir) / LOCK
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# --- meta.json ----------------------------------------------------------------------------------
def read_meta(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / META).read_text())


def write_meta(run_dir: Path, meta: dict) -> None:
    """Atomically (a kill never leaves half a file)."""
    tmp = Path(run_dir) / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, Path(run_dir) / META)


def holds_run(run_dir: Path) -> bool:
    """A folder counts as a run when it holds a results or meta file."""
    return (Path(run_dir) / RESULTS).is_file() or (Path(run_dir) / META).is_file()


PATTERNS = "patterns.json"


def write_patterns(run_dir: Path, record: dict) -> None:
    """The attention patterns the run's code produced (harness.patterns), atomically."""
    tmp = Path(run_dir) / (PATTERNS + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, Path(run_dir) / PATTERNS)


def read_patterns(run_dir: Path) -> dict | None:
    """The run's patterns.json, or None when it recorded none."""
    path = Path(run_dir) / PATTERNS
    return json.loads(path.read_text()) if path.is_file() else None


# --- provenance ---------------------------------------------------------------------------------
OUTPUT_PATHSPECS = (":(exclude)results", ":(exclude)reports")


def git_commit() -> str:
    """HEAD's hash, with ``+dirty`` when tracked code differs from it.

    The repository's own output folders (``results/``, ``reports/``) are left out: a run that
    replaces a committed run folder changes them without changing the code that measures.
    """
    try:
        head = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *OUTPUT_PATHSPECS)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _git(*args) -> str:
    out = subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
    )
    return out.stdout.strip()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(run_id: str, device: str, threads: int) -> dict:
    """The per-row provenance columns (``timestamp`` is added per row)."""
    import torch  # only the measuring side asks: reading a run never imports torch

    is_cuda = device.startswith("cuda")
    return {
        "run_id": run_id,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "threads": threads,
        "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name(torch.device(device)) if is_cuda else "",
    }


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --- reading into pandas ------------------------------------------------------------------------
NUMERIC = [
    "batch", "heads", "kv_heads", "seq_len", "head_dim", "round", "latency_ms",
    "latency_iqr_ms", "peak_mem_mb", "rss_peak_mb", "model_mem_mb", "cache_mb", "flops",
    "counted_flops", "gflops_per_s", "compile_s", "accuracy", "val_accuracy", "best_step",
    "steps", "train_s", "params", "seed", "approx_error", "threads", "steps_per_s",
    "tokens_per_s", "state_mb",
]  # fmt: skip
BOOLEAN = ["causal", "noisy"]
EXACT = ("flops", "counted_flops", "peak_mem_mb")  # kept as text too: exact comparisons
TEXT = ("kind", "variant", "options", "device", "dtype", "pass", "status", "task", "input")


@dataclass
class Run:
    """One run folder as read: its rows (rounds pooled), meta.json and how it ended."""

    path: Path
    rows: pd.DataFrame
    meta: dict = field(default_factory=dict)
    status: str = "ok"  # ok | partial (some rows not ok) | interrupted | running | failed
    reason: str = ""

    @property
    def name(self) -> str:
        return str(self.meta.get("run_id") or self.path.name)

    @property
    def finished(self) -> bool:
        return self.status in ("ok", "partial")


def find_run_dirs(path: Path) -> list[Path]:
    """The run folders under ``path``: itself when it holds a run, else the folders below it
    that do (a Hydra multirun folder holds one run per job, some of them maybe failed)."""
    path = Path(path)
    if path.is_file():  # a results.csv named directly
        return [path.parent]
    if (path / RESULTS).is_file() or not path.is_dir():
        return [path]
    markers = (RESULTS, META, FAILED)
    below = {p.parent for p in path.rglob("*") if p.name in markers and p.is_file()}
    below.discard(path)
    return sorted(below) + ([path] if (path / FAILED).is_file() else []) or [path]


def read_run(path: Path) -> Run:
    """One run folder, rounds pooled; never raises on a missing or broken file (the status
    says what broke)."""
    path = Path(path)
    meta, meta_err = _read_meta(path / META)
    rows, rows_err = _read_rows(path / RESULTS)
    run = Run(path=path, rows=rows, meta=meta)
    run.status, run.reason = _run_status(path, meta, rows, meta_err or rows_err)
    return run


def read_runs(paths) -> list[Run]:
    return [read_run(d) for p in paths for d in find_run_dirs(Path(p))]


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
        return frame([]), "no results.csv"
    try:
        return frame(pool(_parse(path.read_text()))), ""
    except (OSError, ValueError, csv.Error) as e:
        return frame([]), f"results.csv unreadable: {e}"


def pool(rows: list[dict]) -> list[dict]:
    """One row per key: the rounds of a speed cell merged (samples pooled and summarised
    again, the highest memory peak), in the order keys first appear. A failed round never
    replaces good samples: the ok rounds are pooled and the failure noted in ``reason``; a key
    with no ok round keeps its last row. Other kinds: the last row of a key wins."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        r = {**r, "kind": r.get("kind") or "speed"}
        groups.setdefault(row_key(r), []).append(r)
    return [_pooled(g) for g in groups.values()]


def _pooled(group: list[dict]) -> dict:
    ok = [r for r in group if (r.get("status") or "ok") == "ok"]
    if len(group) == 1 or group[0]["kind"] != "speed" or not ok:
        return group[-1]
    row = dict(ok[-1])
    raw = [x for r in ok for x in samples(r.get("samples_ms"))]
    if raw:
        row |= {k: _cell_text(v) for k, v in summarize([x / 1e3 for x in raw]).items()}
        flops = _float(row.get("flops"))
        if flops:
            row["gflops_per_s"] = _cell_text(flops / (float(row["latency_ms"]) * 1e6))
    for col in ("peak_mem_mb", "rss_peak_mb"):
        values = [_float(r.get(col)) for r in ok if _float(r.get(col)) is not None]
        row[col] = _cell_text(max(values)) if values else ""
    failed = [r for r in group if r not in ok]
    row["round"] = ""
    if failed:
        why = "; ".join(f"round {r.get('round') or 0}: {r['status']}" for r in failed)
        row["reason"] = f"{len(ok)} of {len(group)} rounds pooled ({why})"
    return row


def _float(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def frame(rows: list[dict]) -> pd.DataFrame:
    """Rows as a DataFrame with every schema column: numbers as floats, flags as bools, text
    stripped; the raw text of the exact metrics kept in ``<col>_text``. Older files: rows
    without a kind are speed rows, a speed row without kv_heads has as many as heads."""
    df = pd.DataFrame(rows, columns=schema.COLUMNS, dtype=str).fillna("")
    if not df.empty:
        df["kind"] = df["kind"].replace("", "speed")
        no_kv = (df["kind"] == "speed") & (df["kv_heads"] == "")
        df.loc[no_kv, "kv_heads"] = df.loc[no_kv, "heads"]
    for col in EXACT:
        df[f"{col}_text"] = df[col].astype(str).str.strip()
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    for col in BOOLEAN:
        df[col] = df[col].map(lambda x: str(x).strip().lower() in ("true", "1", "yes"))
    for col in TEXT:
        df[col] = df[col].astype(str).str.strip()
    df["status"] = df["status"].str.lower()
    return df


def _run_status(path: Path, meta: dict, rows: pd.DataFrame, read_error: str) -> tuple[str, str]:
    """failed: a FAILED marker, nothing readable, or no ok row at all; running: its lock is
    held; interrupted: meta.json never says it finished; partial: some rows not ok."""
    marker = path / FAILED
    if marker.is_file():
        text = marker.read_text(errors="replace").strip()
        return "failed", "FAILED marker" + (f": {text.splitlines()[0][:300]}" if text else "")
    meta_status = str(meta.get("status", "")).strip().lower()  # a launcher may write one
    if meta_status not in GOOD_META:
        detail = meta.get("error") or meta.get("reason") or ""
        return "failed", f"meta.json status {meta_status!r}" + (f": {detail}" if detail else "")
    if read_error:
        return "failed", read_error
    if rows.empty:
        return "failed", "results.csv has no rows"
    counts = status_counts(rows)
    if (rows["status"] != "ok").all():
        return "failed", f"no ok rows ({counts})"
    if locked(path):
        return "running", f"a sweep is writing it now; {counts}"
    if meta and not finished_stamp(meta):
        when = meta.get("interrupted") or "before it finished"
        return "interrupted", f"stopped {when}; {counts}"
    if (rows["status"] != "ok").any():
        return "partial", counts
    return "ok", ""


def finished_stamp(meta: dict) -> str:
    """When the run (or its last resume) finished normally, or "" if it did not."""
    last = (meta.get("resumes") or [meta])[-1]
    return "" if last.get("interrupted") else str(last.get("finished") or "")


def status_counts(rows: pd.DataFrame) -> str:
    counts = Counter(rows["status"])
    return ", ".join(f"{n} {s}" for s, n in counts.most_common())


def load(paths) -> tuple[list[Run], pd.DataFrame]:
    """Every run under ``paths`` and all their rows in one frame, each row with ``run_dir`` and
    ``run_name``; provenance columns a row lacks are filled from its meta.json."""
    runs = read_runs(paths)
    frames = []
    for run in runs:
        df = run.rows.copy()
        df["run_dir"] = str(run.path)
        df["run_name"] = run.name
        for col in ("git_commit", "run_id", "torch_version", "cpu", "gpu", "device"):
            df[col] = df[col].where(df[col].astype(str) != "", str(run.meta.get(col, "") or ""))
        frames.append(df)
    rows = pd.concat(frames, ignore_index=True) if frames else frame([])
    if not frames:
        rows["run_dir"] = rows["run_name"] = pd.Series(dtype=str)
    return runs, rows


def compact_options(options) -> str:
    """``{"seed": 0, "window": 64}`` (rows hold sorted JSON) as ``seed=0,window=64``."""
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


def options_dict(text) -> dict:
    try:
        parsed = json.loads(str(text))
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}

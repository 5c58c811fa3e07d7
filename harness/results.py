"""``results/<run_id>/results.csv`` (one row per cell, appended as each finishes) and
``meta.json`` (where the numbers came from).

Rows are flushed one by one, so a sweep that is killed keeps every finished cell, and a resumed
sweep knows exactly which cells are done.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from .schema import CELL_KEY, COLUMNS

REPO = Path(__file__).resolve().parent.parent


# --- provenance -------------------------------------------------------------------------------
def git_commit() -> str:
    """HEAD's hash, with ``+dirty`` when the working tree differs from it."""
    try:
        head = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
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


def gpu_name(device: str) -> str:
    if torch.device(device).type != "cuda":
        return ""
    return torch.cuda.get_device_name(torch.device(device))


def provenance(run_id: str, device: str, threads: int) -> dict:
    """The per-row provenance columns (``timestamp`` is added per row)."""
    return {
        "run_id": run_id,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "threads": threads,
        "cpu": cpu_model(),
        "gpu": gpu_name(device),
    }


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --- the table --------------------------------------------------------------------------------
def cell_key(row: dict) -> tuple:
    """A cell's identity as strings, the same whether the row was just made or read back."""
    return tuple(_text(row.get(c)) for c in CELL_KEY)


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict | list):  # options, as the same sorted JSON everywhere
        return json.dumps(value, sort_keys=True)
    return str(value)


class ResultsFile:
    """``results.csv`` with the header of harness.schema.COLUMNS, appended one row at a time."""

    def __init__(self, path: Path):
        self.path = path
        self._repair()
        if not self.path.exists():
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)

    def _repair(self) -> None:
        """A kill in the middle of a write can leave a partial last line: drop it."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.path.write_bytes(data[: data.rfind(b"\n") + 1])

    def rows(self) -> list[dict]:
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))

    def done_cells(self) -> set[tuple]:
        return {cell_key(r) for r in self.rows() if r.get("kind", "speed") == "speed"}

    def done_tasks(self) -> set[tuple]:
        """(task, variant, seq_len, seed) of the accuracy and approximation rows present."""
        done = set()
        for r in self.rows():
            if r.get("kind") in ("accuracy", "approx"):
                done.add((r["task"], r["variant"], _int(r["seq_len"]), _int(r["seed"])))
        return done

    def append(self, row: dict) -> None:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise KeyError(f"not results columns (see harness/schema.py): {sorted(unknown)}")
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([_text(row.get(c)) for c in COLUMNS])
            f.flush()


def _int(text: str) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


# --- meta.json --------------------------------------------------------------------------------
def read_meta(run_dir: Path) -> dict:
    return json.loads((run_dir / "meta.json").read_text())


def write_meta(run_dir: Path, meta: dict) -> None:
    """Atomically (a kill never leaves half a file)."""
    tmp = run_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, run_dir / "meta.json")

"""Each run once: its id, machine, commit (uncommitted code flagged), the command that
reproduces it, how it ended, and the rows a later run replaced."""

from __future__ import annotations

import pandas as pd

from harness.results import finished_stamp

from .load import Data, most_common
from .tables import format_peak

NO_COMMAND = "not recorded (the run predates meta.json's command)"


def runs_table(data: Data) -> pd.DataFrame:
    out = [_run_row(run, data) for run in data.runs]
    cols = [
        "run",
        "status",
        "machine",
        "commit",
        "dirty",
        "command",
        "started",
        "finished",
        "rows",
        "ok_rows",
        "replaced_rows",
        "folder",
        "detail",
        "torch",
        "allocator",
        "matmul_peak_gflops",
    ]
    return pd.DataFrame(out, columns=cols)


def _run_row(run, data: Data) -> dict:
    mine = data.rows[data.rows["run_dir"] == str(run.path)]
    gone = data.replaced[data.replaced["run_dir"] == str(run.path)]
    every = pd.concat([mine, gone])
    commits = _commits(run.meta, every)
    return {
        "run": run.name,
        "status": run.status,
        "machine": most_common(every["machine"]) if len(every) else "-",
        "commit": ", ".join(commits) or "unknown",
        "dirty": any(c.endswith("+dirty") for c in commits),
        "command": command(run.meta),
        "started": str(run.meta.get("started", "") or ""),
        "finished": finished_stamp(run.meta) if run.meta else "",
        "rows": len(every),
        "ok_rows": int((every["status"] == "ok").sum()),
        "replaced_rows": _replaced_text(gone),
        "folder": str(run.path),
        "detail": run.reason,
        "torch": str(run.meta.get("torch_version", "") or most_common(every["torch_version"])),
        "allocator": str(run.meta.get("allocator", "") or ""),
        "matmul_peak_gflops": format_peak(run.meta.get("matmul_peak_gflops")),
    }


def _commits(meta: dict, rows: pd.DataFrame) -> list[str]:
    """Every commit the run's rows were measured at (a resume may add one), meta's first."""
    found = [str(meta.get("git_commit") or "")] + [str(c) for c in rows["git_commit"]]
    return [c for c in dict.fromkeys(found) if c not in ("", "nan")]


def command(meta: dict) -> str:
    """The command that reproduces the run (a resumed run: its first, then each resume's)."""
    first = meta.get("command")
    if not first and meta.get("overrides") is not None:
        first = " ".join(["python -m harness", *map(str, meta["overrides"])])
    resumes = [r.get("command") for r in meta.get("resumes") or [] if r.get("command")]
    text = str(first or NO_COMMAND)
    return text + "".join(f"\nthen: {c}" for c in resumes)


def _replaced_text(gone: pd.DataFrame) -> str:
    if gone.empty:
        return ""
    by = gone["by"].value_counts()
    return ", ".join(f"{n} by {run}" for run, n in by.items())


def short_commit(commit: str) -> str:
    return ", ".join(c[:7] + ("+dirty" if c.endswith("+dirty") else "") for c in commit.split(", "))

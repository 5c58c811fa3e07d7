"""The report a person reads: ``python -m harness.report RESULTS_DIR [...]``.

Writes ``<out>/<name>/index.html`` (one self-contained page: inline CSS and a few lines of
inline script for sorting, plots as data: PNGs, no network) and the CSV tables behind it. Built
from the results alone: nothing here imports ``variants``, torch or the measuring code.

Modules: ``load`` (the rows as a reader sees them), ``groups`` (variant groups and colours),
``tables`` (kernel speed series), ``decode``, ``training`` (the whole-model step), ``accuracy``
(seeds), ``summary`` (the leaderboards and sentences), ``runs``, ``patterns`` (the run's
patterns.json), ``published`` (Long Range Arena's figures), ``plots``, ``markup`` and ``page``
(assembly). Plotting is imported only when a report is rendered.
"""

from __future__ import annotations

from pathlib import Path


def render(
    results_dirs: list[Path],
    out_dir: Path | None = None,
    reference: str = "sdpa",
    name: str | None = None,
    patterns: bool = True,
) -> Path:
    """Render the report of ``results_dirs`` into ``out_dir/name/`` (``out_dir`` defaults to
    ``reports``, ``name`` to the run ids) and return the path of its index.html.

    ``patterns=False`` leaves out the attention-pattern section (the patterns the runs
    recorded). Never raises on partial or failed results: those are shown in the page.
    """
    from .page import build

    return build(results_dirs, out_dir, reference, name, patterns)


__all__ = ["render"]

"""The report a person reads: ``python -m harness.report RESULTS_DIR [...]``.

Writes ``<out>/<name>/index.html`` (one self-contained page: inline CSS, plots as data: PNGs,
no script, no network) and the CSV tables behind it. Modules: ``load`` (read results folders),
``tables`` (the numbers), ``plots`` (the figures), ``patterns`` (attention patterns from the
variants' code), ``page`` (assembly). Plotting is imported only when a report is rendered, so
``harness.compare`` can reuse ``load`` without matplotlib.
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

    ``patterns=False`` skips the attention-pattern section, which runs every registered variant.
    Never raises on partial or failed results: those are shown in the page.
    """
    from .page import build

    return build(results_dirs, out_dir, reference, name, patterns)


__all__ = ["render"]

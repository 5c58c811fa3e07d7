"""Accuracy on long-range tasks (see ../shared/design/tasks.md): offline, seeded generators for
ListOps, multi-query associative recall and Pathfinder, a small encoder whose attention is a
registered variant, its trainer, and approximation error against ``full``.

The harness calls :func:`run_task`; reports show :func:`majority_baseline` and
:func:`chance_level` beside the accuracies.
"""

from .presets import PRESETS
from .run import TASKS, chance_level, majority_baseline, row_key, run_task

__all__ = ["PRESETS", "TASKS", "chance_level", "majority_baseline", "row_key", "run_task"]

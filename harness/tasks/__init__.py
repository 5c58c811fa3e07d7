"""Accuracy on long-range tasks (docs/tasks.md): offline, seeded generators for ListOps,
multi-query associative recall and Pathfinder, a small encoder whose attention is a registered
variant, its trainer, and approximation error against exact attention. Each task's sizes are
Hydra configs (conf/task/<task>/<preset>.yaml); :func:`run.run_task` runs them through the
measuring worker.
"""

from .run import TASKS, chance_level, majority_baseline, run_task

__all__ = ["TASKS", "chance_level", "majority_baseline", "run_task"]

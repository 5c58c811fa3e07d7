"""``python -m harness [overrides...]``: compose the config, then call :func:`harness.sweep.run`.

Examples::

    python -m harness                                   # the default sweep on this CPU
    python -m harness sweep=ci                          # a tiny grid, about a minute
    python -m harness sweep.variants=[full,local] sweep.seq_lens=[1024,2048] variant.local.window=64
    python -m harness sweep=gpu                         # bf16 on a CUDA GPU (selects device=cuda)
    python -m harness resume=<run_id>                   # measure only the cells still missing
    python -m harness task=mqar preset=cpu              # accuracy rows (harness/tasks)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra

from harness import config  # noqa: F401  (stores the structured configs)
from harness.sweep import ConfigError, run


def _discard_hydra_output() -> None:
    """A refused run leaves nothing behind: remove the folder Hydra made for its own output,
    but only when that is all the run folder holds."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir = hydra_dir.parent
    if hydra_dir.name == ".hydra" and [p.name for p in run_dir.iterdir()] == [".hydra"]:
        shutil.rmtree(run_dir, ignore_errors=True)
        if run_dir.parent.is_dir() and not any(run_dir.parent.iterdir()):
            run_dir.parent.rmdir()  # the results folder itself, if this run made it


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    try:
        run(cfg)
    except ConfigError as e:
        _discard_hydra_output()
        print(f"error: {e}", file=sys.stderr)
        if _multirun():
            raise  # Hydra records this job as failed and runs the others
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished cells are saved: resume with resume={cfg.run_id}")
        sys.exit(130)


if __name__ == "__main__":
    main()

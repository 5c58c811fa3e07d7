"""``python -m harness [overrides...]``: compose the config, then call :func:`harness.sweep.run`.

Examples::

    python -m harness                                   # the default sweep on this CPU
    python -m harness sweep=ci                          # a tiny grid, about a minute
    python -m harness sweep.variants=[full,local] sweep.seq_lens=[1024,2048] variant.local.window=64
    python -m harness sweep=gpu                         # bf16 on a CUDA GPU (selects device=cuda)
    python -m harness resume=<run_id>                   # measure only the cells still missing
    python -m harness task=mqar preset=cpu              # accuracy rows (harness/tasks)
    python -m harness -m sweep.variants=[full],[local]  # a multirun: results/multirun-<id>/

In a multirun every job's run folder goes into the multirun's folder (Hydra's sweep dir), and a
job that fails leaves a ``FAILED`` file in its run folder, which ``python -m harness.report``
shows as a failed run beside the others (docs/cluster.md).
"""

from __future__ import annotations

import multiprocessing
import sys
import traceback
from pathlib import Path

import hydra

from harness import config  # noqa: F401  (stores the structured configs)
from harness.cell import one_line
from harness.results import RunLocked
from harness.sweep import ConfigError, run


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _into_multirun_folder(cfg) -> None:
    """A multirun job writes its run folder into the multirun's folder, beside the others."""
    from hydra.core.hydra_config import HydraConfig

    cfg.results_dir = str(HydraConfig.get().sweep.dir)


def _plain_start_method() -> None:
    """A job of the joblib launcher runs in a loky process, whose default start method is
    'loky'; the measuring worker, a plain spawn child, would try to re-apply it and die."""
    method = multiprocessing.get_start_method(allow_none=True)
    if method not in (None, *multiprocessing.get_all_start_methods()):
        multiprocessing.set_start_method("spawn", force=True)


def _mark_failed(cfg, error: BaseException) -> None:
    """A ``FAILED`` file in the run folder, which harness.report shows as a failed run. Only
    where that folder exists (a multirun job's always does: Hydra's output is inside it)."""
    run_dir = Path(cfg.results_dir) / str(cfg.resume or cfg.run_id)
    if not run_dir.is_dir():
        return
    what = "refused" if isinstance(error, ConfigError) else type(error).__name__
    first, overrides = f"{what}: {one_line(str(error), 240)}", ""
    if _multirun():  # the first line is what the report shows; the job's overrides below it
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        first += f" (multirun job #{hydra_cfg.job.num})"
        overrides = "overrides: " + " ".join(hydra_cfg.overrides.task)
    detail = "" if isinstance(error, ConfigError) else traceback.format_exc()
    text = f"{first}\n{overrides}\n\n{detail}"
    try:
        (run_dir / "FAILED").write_text(text)
    except OSError as e:  # the job's own error is the one to raise
        print(f"could not write {run_dir / 'FAILED'}: {e}", file=sys.stderr)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    if _multirun():
        _into_multirun_folder(cfg)
        _plain_start_method()
    try:
        run_dir = run(cfg, _overrides())
    except (ConfigError, RunLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        if _multirun():
            if isinstance(e, ConfigError):
                _mark_failed(cfg, e)  # shown in the multirun's report beside the other jobs
            raise  # Hydra records this job as failed and runs the others
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished cells are saved: resume with resume={cfg.run_id}")
        sys.exit(130)
    except OSError as e:  # a full disk, say: every row written before is on disk
        _mark_failed(cfg, e)
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        if _multirun():
            raise
        sys.exit(1)
    except Exception as e:  # the run folder keeps what it finished; mark it, then fail as before
        _mark_failed(cfg, e)
        raise
    (run_dir / "FAILED").unlink(missing_ok=True)  # a resume that completed a failed run
    if cfg.report:
        render_report(run_dir, cfg.report_dir)


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def render_report(run_dir: Path, report_dir: str | None) -> Path | None:
    """The report of this run, beside its results (or in ``report_dir``). Entry point code: the
    measuring layer never imports the report; both are imported from here."""
    from harness import report

    out = Path(report_dir) if report_dir else run_dir
    name = None if report_dir else "report"
    try:
        page = report.render([run_dir], out_dir=out, name=name)
    except Exception as e:  # the results are safe on disk; say why there is no page
        print(f"report: not rendered ({one_line(f'{type(e).__name__}: {e}', 300)})")
        return None
    print(f"report: {page}")
    return Path(page)


if __name__ == "__main__":
    main()

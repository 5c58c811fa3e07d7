"""Beyond one process: Hydra launchers and the prepared GPU script.

The Slurm launcher config composes into the sbatch script a cluster would get; a multirun through
submitit_local (and joblib) puts every job's run folder into one place, whose report shows a job
made to fail as failed beside the others; the GPU script's dry run goes through every stage on
this CPU.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import harness.config as hconfig
from harness.report import render
from harness.results import load

ROOT = hconfig.CONF_DIR.parent

# One cell per job, as small as a cell gets: the time is the processes' start, not the cells.
TINY = [
    "sweep=ci",
    "sweep.seq_lens=[32]",
    "sweep.num_heads=[1]",
    "sweep.head_dims=[16]",
    "sweep.causal=[false]",
    "sweep.passes=[fwd]",
    "sweep.min_run_time=0.005",
    "sweep.min_blocks=2",
    "device.matmul_size=128",
    "device.threads=1",
    "report=false",
]


def compose_hydra(*overrides: str):
    with initialize_config_dir(config_dir=str(hconfig.CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def multirun(*overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness", "-m", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )


def statuses(path: Path) -> dict[str, str]:
    runs, _ = load([path])
    return {run.path.name: run.status for run in runs}


# --- the Slurm launcher config ----------------------------------------------------------------
def test_slurm_launcher_composes_with_its_defaults():
    launcher = compose_hydra("hydra/launcher=slurm").hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition is None  # the cluster's default partition
    assert launcher.gpus_per_node == 1
    assert launcher.timeout_min == 60
    assert launcher.cpus_per_task >= 1 and launcher.mem_gb >= 1
    # submitit's own keys are still there, under the same names
    assert {"account", "qos", "constraint", "setup", "additional_parameters"} <= set(launcher)


def test_slurm_launcher_overrides_reach_the_sbatch_script(tmp_path, monkeypatch):
    """partition, GPUs per job and time limit from the command line end up as #SBATCH lines
    (submitit refuses to build a Slurm executor without `srun`: a stub stands in for it)."""
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose_hydra(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu-h200",
        "hydra.launcher.gpus_per_node=2",
        "hydra.launcher.timeout_min=45",
        "hydra.launcher.cpus_per_task=6",
        "hydra.launcher.mem_gb=48",
        f"results_dir={tmp_path}",
    )
    launcher = instantiate(cfg.hydra.launcher)
    assert launcher.params["partition"] == "gpu-h200"
    assert launcher.params["submitit_folder"].startswith(f"{tmp_path}/multirun-")
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{srun.parent}{os.pathsep}{os.environ['PATH']}")
    # The parameters as the launcher hands them to submitit (its launch() does the same).
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {
        k if k in base else f"slurm_{k}": v
        for k, v in launcher.params.items()
        if k not in ("submitit_folder", "max_num_timeout")
    }
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit")
    executor.update_parameters(**params)
    sbatch = executor._executor._make_submission_file_text("python -m harness", "uid")
    for line in (
        "--partition=gpu-h200",
        "--gpus-per-node=2",
        "--time=45",
        "--cpus-per-task=6",
        "--mem=48GB",
        "--job-name=attnbench",
    ):
        assert f"#SBATCH {line}\n" in sbatch


def test_every_launcher_config_composes():
    for path in sorted((hconfig.CONF_DIR / "hydra" / "launcher").glob("*.yaml")):
        assert compose_hydra(f"hydra/launcher={path.stem}").hydra.launcher._target_


# --- multiruns --------------------------------------------------------------------------------
def test_refused_jobs_of_a_multirun_are_failed_runs_in_its_folder(tmp_path):
    """The basic launcher; both jobs refused (a config error, found inside each job): one
    multirun folder holds both run folders, each with a FAILED file the report reads."""
    proc = multirun(*TINY, "device.threads=0,-1", f"results_dir={tmp_path}", timeout=120)
    assert proc.returncode != 0
    (folder,) = tmp_path.glob("multirun-*")
    runs = [p for p in folder.iterdir() if p.is_dir()]
    assert len(runs) == 2
    for run in runs:
        assert (run / "FAILED").read_text().startswith("refused: device.threads must be >= 1")
    assert set(statuses(folder).values()) == {"failed"}


@pytest.mark.slow
def test_submitit_local_multirun_merges_and_shows_the_failed_job(tmp_path):
    """Three jobs through submitit_local, one per variant; the `local` job's run folder has a
    directory where its results.csv goes, so that job fails inside its run. The other two
    finish, and one report of the multirun folder shows two ok runs and one failed."""
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "job-local" / "results.csv").mkdir(parents=True)  # the fault
    proc = multirun(
        *TINY,
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        f"hydra.sweep.dir={sweep_dir}",
        "run_id=job-${sweep.variants[0]}",
        "sweep.variants=[full],[sdpa_math],[local]",
    )
    assert proc.returncode != 0, "a failed job fails the multirun command"
    assert "IsADirectoryError" in proc.stderr
    assert statuses(sweep_dir) == {"job-full": "ok", "job-sdpa_math": "ok", "job-local": "failed"}
    for ok in ("job-full", "job-sdpa_math"):
        rows = list(csv.DictReader((sweep_dir / ok / "results.csv").open()))
        assert [(r["variant"], r["status"]) for r in rows] == [(ok.removeprefix("job-"), "ok")]
    marker = (sweep_dir / "job-local" / "FAILED").read_text()
    assert marker.startswith("IsADirectoryError") and "(multirun job #2)" in marker
    assert "sweep.variants=[local]" in marker

    page = render([sweep_dir], tmp_path / "reports", name="multirun", patterns=False)
    runs = {r["run"]: r for r in csv.DictReader((page.parent / "runs.csv").open())}
    assert {k: v["status"] for k, v in runs.items()} == {
        "job-full": "ok",
        "job-sdpa_math": "ok",
        "job-local": "failed",
    }
    assert "IsADirectoryError" in runs["job-local"]["detail"]
    html = page.read_text()
    assert "Run job-local FAILED" in html
    speed = list(csv.DictReader((page.parent / "speed_cells.csv").open()))
    assert {r["variant"] for r in speed} == {"full", "sdpa_math"}


@pytest.mark.slow
def test_joblib_multirun_jobs_can_start_their_measuring_worker(tmp_path):
    """A joblib job runs in a loky process; the harness's spawned worker must still start."""
    proc = multirun(
        *TINY,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "sweep.variants=[full],[sdpa_math]",
        f"results_dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (folder,) = tmp_path.glob("multirun-*")
    assert sorted(statuses(folder).values()) == ["ok", "ok"]


# --- the GPU script ---------------------------------------------------------------------------
def test_gpu_script_is_valid_bash_and_explains_itself():
    script = ROOT / "scripts" / "gpu_run.sh"
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    usage = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--dry-run" in usage.stdout
    wrong = subprocess.run(["bash", script, "--nope"], capture_output=True, text=True)
    assert wrong.returncode == 2


def test_nothing_is_missing_here():
    """This environment has every module the GPU script would otherwise install."""
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_run.py", "missing"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path):
    env = {**os.environ, "GPU_RUN_OUT": str(tmp_path), "PYTHON": sys.executable, "NAME": "dry"}
    started = time.perf_counter()
    proc = subprocess.run(
        ["bash", "scripts/gpu_run.sh", "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stages (exit codes): speed=0 mqar=0 report=0" in proc.stdout
    assert wall < 150, f"the dry run took {wall:.0f} s (about 60 s on an idle 2-core machine)"
    results = tmp_path / "results" / "dry"
    ran = statuses(results)  # partial: some rows are `unsupported` (CUDA-only kernels)
    assert set(ran) == {"speed", "mqar"} and set(ran.values()) <= {"ok", "partial"}, ran
    speed = list(csv.DictReader((results / "speed" / "results.csv").open()))
    seen = {(r["variant"], r["pass"]): r["status"] for r in speed}
    assert seen[("xformers", "fwd")] == "unsupported"  # CUDA only, with its reason
    assert seen[("flex_full", "fwd")] == "ok"  # the twins, eagerly on CPU
    assert seen[("full", "fwd_bwd")] == "ok"
    assert any("bigbird" in r["options"] for r in speed)
    meta = json.loads((results / "mqar" / "meta.json").read_text())
    assert meta["time_capped"]["max_train_s"] >= 5
    accuracy = list(csv.DictReader((results / "mqar" / "results.csv").open()))
    assert {r["variant"] for r in accuracy if r["kind"] == "accuracy"} == {"full", "local"}
    assert (tmp_path / "reports" / "dry" / "index.html").is_file()
    assert "fastest forward first" in proc.stdout

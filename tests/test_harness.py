"""The harness end to end: configs compose, sweeps write every row, failures are rows, resume
measures nothing twice, the measurements agree with the variants' own models."""

from __future__ import annotations

import csv
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import harness.config as hconfig
import variants
from harness import allocator, cell, measure, sweep, validate
from harness.results import cell_key
from harness.schema import CELL_KEY, COLUMNS
from harness.sweep import ConfigError, run
from variants.common import dense_pairs, softmax_flops

ROOT = Path(variants.__file__).resolve().parent.parent  # the checkout whose code is under test
PRESETS = sorted(p.stem for p in (hconfig.CONF_DIR / "sweep").glob("*.yaml"))

# Small and quick: every run below measures cells of a few microseconds each.
TINY = [
    "sweep=ci",
    "sweep.seq_lens=[32]",
    "sweep.num_heads=[1]",
    "sweep.head_dims=[16]",
    "sweep.causal=[false]",
    "sweep.min_run_time=0.005",
    "sweep.min_blocks=2",
    "device.matmul_size=128",
    "report=false",
]


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(hconfig.CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def tiny(tmp_path: Path, *more: str):
    return compose_cfg(*TINY, f"results_dir={tmp_path}", *more)


def read_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "results.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def keys(rows) -> list[tuple]:
    return [tuple(r[c] for c in CELL_KEY) for r in rows]


# --- test-only variants: module-level so a spawned worker can unpickle and register them -------
class _Small(variants.Attention):
    def flops(self, *, batch, heads, seq_len, head_dim, causal=False, backward=False):
        pairs = dense_pairs(seq_len, causal)
        return softmax_flops(
            batch=batch, heads=heads, pairs=pairs, head_dim=head_dim, backward=backward
        )


class Raising(_Small):
    def attend(self, q, k, v, causal):
        raise RuntimeError("injected failure")


@dataclass
class SleepyConfig(variants.Common):
    seconds: float = 60.0  # far over the test's time limit


class Sleepy(_Small):
    def attend(self, q, k, v, causal):
        time.sleep(self.cfg.seconds)
        return q


class Dying(_Small):
    def attend(self, q, k, v, causal):
        os._exit(3)  # a crash the worker cannot report


class Hog(_Small):
    def memory_model(self, **shape):
        return 10**15  # a petabyte: over any budget

    def attend(self, q, k, v, causal):
        raise AssertionError("an over-budget cell must not run")


TEST_VARIANTS = {
    "test_raise": (Raising, variants.Common),
    "test_sleep": (Sleepy, SleepyConfig),
    "test_die": (Dying, variants.Common),
    "test_hog": (Hog, variants.Common),
}


@pytest.fixture(scope="module")
def injected_variants():
    for name, (cls, config) in TEST_VARIANTS.items():
        variants.register(name, config=config)(cls)
    yield list(TEST_VARIANTS)
    for name in TEST_VARIANTS:
        variants.registry._REGISTRY.pop(name, None)


# --- configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_preset_composes(preset, device):
    cfg = compose_cfg(f"sweep={preset}", f"device={device}")
    assert cfg.sweep.name == preset
    assert set(variants.available()) <= set(cfg.variant)  # every variant's options are there
    assert cfg.sweep.seq_lens and cfg.sweep.passes


def test_presets_cover_the_issue():
    assert {"default", "ci", "scaling", "gpu"} <= set(PRESETS)
    scaling = compose_cfg("sweep=scaling").sweep
    assert list(scaling.seq_lens) == [1024, 2048, 4096, 8192, 16384]
    assert (list(scaling.num_heads), list(scaling.head_dims)) == ([8], [64])
    gpu = compose_cfg("sweep=gpu")
    assert gpu.device.name == "cuda" and list(gpu.sweep.dtypes) == ["bfloat16"]
    assert max(gpu.sweep.seq_lens) == 32768


@pytest.mark.parametrize("preset,left_out", [("default", None), ("ci", "flex_*")])
def test_cpu_presets_sweep_every_variant(preset, left_out):
    names = {e.name for e in validate.check(compose_cfg(f"sweep={preset}")).entries}
    expected = {n for n in variants.available() if not (left_out and fnmatch.fnmatch(n, left_out))}
    assert names == expected  # "all" leaves out nothing the preset does not name


def test_variant_options_and_extra_cells():
    cfg = compose_cfg(
        "sweep.variants=[full]",
        "variant.full.chunk_size=32",
        "+sweep.extra=[{variant: full, options: {chunk_size: 16}}]",
        "sweep.seq_lens=[64]",
        "sweep.num_heads=[2]",
        "sweep.passes=[fwd]",
    )
    cells = sweep.grid(validate.check(cfg), cfg.sweep)
    assert sorted(c["options"]["chunk_size"] for c in cells) == [16, 32]
    narrowed = compose_cfg(
        "sweep.variants=[sdpa]",
        "+sweep.extra=[{variant: 'flex_*', num_heads: [3], seq_lens: [32]}]",
        "sweep.seq_lens=[64,128]",
        "sweep.num_heads=[2]",
        "sweep.passes=[fwd]",
    )
    cells = sweep.grid(validate.check(narrowed), narrowed.sweep)
    flex = {n for n in variants.available() if n.startswith("flex_")}
    assert {(c["variant"], c["heads"], c["seq_len"]) for c in cells} == {
        ("sdpa", 2, 64), ("sdpa", 2, 128), *((n, 3, 32) for n in flex)
    }  # fmt: skip


# --- end to end -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny sweep, shared: three variants (one unsupported on CPU) x two passes."""
    out = tmp_path_factory.mktemp("tiny")
    return run(tiny(out, "sweep.variants=[full,sdpa_math,xformers]", "run_id=tiny"))


def test_tiny_sweep_writes_every_row_and_column(tiny_run):
    with (tiny_run / "results.csv").open() as f:
        assert next(csv.reader(f)) == COLUMNS
    rows = read_rows(tiny_run)
    assert len(rows) == 6 and len(set(keys(rows))) == 6  # 3 variants x 1 shape x 2 passes
    by = {(r["variant"], r["pass"]): r for r in rows}
    assert by[("xformers", "fwd")]["status"] == "unsupported"
    assert "CUDA" in by[("xformers", "fwd")]["reason"]
    for name in ("full", "sdpa_math"):
        for p in ("fwd", "fwd_bwd"):
            r = by[(name, p)]
            assert r["status"] == "ok", r["reason"]
            assert len(r["samples_ms"].split()) >= 2
            for col in ("latency_ms", "latency_iqr_ms", "peak_mem_mb", "flops", "gflops_per_s"):
                assert float(r[col]) >= 0, col
            for col in ("run_id", "git_commit", "torch_version", "threads", "cpu", "timestamp"):
                assert r[col], col
        # FlopCounterMode sees the matmuls of the forward: equal to the analytic count
        assert by[(name, "fwd")]["counted_flops"] == by[(name, "fwd")]["flops"]
    meta = json.loads((tiny_run / "meta.json").read_text())
    assert meta["matmul_peak_gflops"]["float32"] > 0
    assert meta["config"]["sweep"]["seq_lens"] == [32]


def test_resume_measures_nothing_twice(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "tiny")
    run_dir, first = tmp_path / "tiny", read_rows(tiny_run)
    run(tiny(tmp_path, "resume=tiny"))  # everything is there: nothing is measured
    assert read_rows(run_dir) == first
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["resumes"][-1]["measured"] == {} and meta["status_counts"]["ok"] == 4
    lines = (run_dir / "results.csv").read_text().splitlines(keepends=True)
    (run_dir / "results.csv").write_text("".join(lines[:-2]) + lines[-2][:15])  # a torn write
    run(tiny(tmp_path, "resume=tiny"))
    again = read_rows(run_dir)
    assert sorted(keys(again)) == sorted(keys(first))  # the two missing cells, once each
    assert again[:4] == first[:4]  # the others untouched


@pytest.fixture(scope="module")
def failures_run(tmp_path_factory, injected_variants) -> dict:
    """Unchunked `full` at a size where its n x n scores dominate memory, then failing, dying,
    over-budget and hanging variants: one sweep, so worker restarts are paid once."""
    out = tmp_path_factory.mktemp("failures")
    cfg = tiny(
        out,
        # full first (a warm worker); after the timeout only a cell decided without a worker
        "sweep.variants=[full,test_raise,test_die,test_hog,test_sleep,xformers]",
        "sweep.seq_lens=[2048]",
        "sweep.num_heads=[4]",
        "sweep.head_dims=[64]",
        "sweep.passes=[fwd]",
        "sweep.timeout_s=6",  # full's cell takes ~1 s; seconds more on a busy machine
        "sweep.memory_budget_mb=4000",
    )
    return {r["variant"]: r for r in read_rows(run(cfg))}


def test_failures_are_rows_and_the_sweep_finishes(failures_run):
    rows = failures_run
    assert rows["test_raise"]["status"] == "error"
    assert "injected failure" in rows["test_raise"]["reason"]
    assert rows["test_sleep"]["status"] == "timeout"
    assert rows["test_die"]["status"] == "error" and "died" in rows["test_die"]["reason"]
    assert rows["test_hog"]["status"] == "oom" and "budget" in rows["test_hog"]["reason"]
    assert rows["xformers"]["status"] == "unsupported"  # the sweep went on to the end


def test_cpu_peak_memory_of_full_matches_its_model(failures_run):
    row = failures_run["full"]
    measured, model = float(row["peak_mem_mb"]), float(row["model_mem_mb"])
    assert model > 100  # two 2048 x 2048 float32 matrices for each of 4 heads: n^2 dominates
    assert abs(measured - model) / model < 0.15, (measured, model)


JEMALLOC = allocator.LIBRARIES["jemalloc"]


@pytest.mark.skipif(
    not any((Path(d) / f).exists() for d in allocator.LIB_DIRS for f in JEMALLOC),
    reason="libjemalloc is not installed",
)
def test_jemalloc_worker_keeps_peak_memory_honest(tmp_path):
    """Under jemalloc, which keeps freed pages, the peak is still the call's own memory."""
    cfg = tiny(
        tmp_path,
        "device.allocator=jemalloc",
        "sweep.variants=[full,linear]",  # linear first: its freed pages must not hide full's
        "sweep.seq_lens=[2048]",
        "sweep.num_heads=[4]",
        "sweep.head_dims=[64]",
        "sweep.passes=[fwd]",
    )
    run_dir = run(cfg)
    assert json.loads((run_dir / "meta.json").read_text())["allocator"] == "jemalloc"
    row = {r["variant"]: r for r in read_rows(run_dir)}["full"]
    measured, model = float(row["peak_mem_mb"]), float(row["model_mem_mb"])
    assert abs(measured - model) / model < 0.15, (measured, model)


def test_injected_slowdown_waits_its_share(monkeypatch):
    """``inject_slowdown``: a call of 10 clock units is followed by a wait of 5 (factor 1.5)."""
    clock = {"t": 0.0}

    def tick():
        clock["t"] += 0.01  # every reading of the fake clock advances it a little
        return clock["t"]

    def step():
        clock["t"] += 10.0

    monkeypatch.setattr(cell.time, "perf_counter", tick)
    assert cell.slowed(step, 1.0, "cpu") is step
    cell.slowed(step, 1.5, "cpu")()
    assert 15.0 <= clock["t"] < 15.1


@pytest.mark.slow
def test_kill_halfway_then_resume_gives_every_row_once(tmp_path):
    overrides = [*TINY, "sweep.variants=[full,sdpa_math]", "sweep.seq_lens=[32,64]"]
    overrides += ["sweep.min_run_time=0.3", f"results_dir={tmp_path}", "run_id=k"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", *overrides],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    csv_path = tmp_path / "k" / "results.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if csv_path.exists() and len(csv_path.read_text().splitlines()) >= 3:  # 2 rows done
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_rows(tmp_path / "k")
    assert 2 <= len(partial) < 8
    run(compose_cfg(*overrides, "resume=k"))
    rows = read_rows(tmp_path / "k")
    cfg = compose_cfg(*[o for o in overrides if o != "run_id=k"])  # the plan of a new run
    expected = [cell_key(sweep.cell_row(c)) for c in sweep.grid(validate.check(cfg), cfg.sweep)]
    assert sorted(keys(rows)) == sorted(expected)  # the same rows as an uninterrupted run
    assert {r["status"] for r in rows} == {"ok"}


# --- measurements against the models ----------------------------------------------------------
@pytest.mark.parametrize("name", ["full", "sdpa_math"])
def test_counted_flops_equal_analytic(name):
    shape = dict(batch=2, heads=3, seq_len=64, head_dim=16)
    attn = variants.build(name, seq_len=64, num_heads=3, head_dim=16)
    q, k, v = (torch.randn(2, 3, 64, 16) for _ in range(3))
    counted = measure.count_flops(measure.forward_step(attn, q, k, v, causal=False))
    assert counted == attn.flops(**shape, causal=False)


def test_summary_flags_noise():
    steady = measure.summarize([1e-3, 1.01e-3, 0.99e-3, 1e-3])
    assert not steady["noisy"] and steady["latency_ms"] == pytest.approx(1.0)
    assert measure.summarize([1e-3, 2e-3, 1e-3, 3e-3])["noisy"]


# --- refusing bad input -----------------------------------------------------------------------
BAD = [
    ("sweep.variants=[nope]", "available: "),
    ("sweep.seq_lens=[0]", "positive"),
    ("sweep.num_heads=[-2]", "positive"),
    ("sweep.dtypes=[int8]", "unknown dtype"),
    ("sweep.passes=[bwd]", "unknown pass"),
    ("variant.full.chunk_size=0", "chunk_size"),
    ("resume=nothing-here", "no run there"),
    ("device.allocator=/nope/libmalloc.so", "no such file"),
    ("device.allocator=tcmalloc2", "unknown; use system, jemalloc"),
    ("+inject_slowdown.nope=1.5", "not a variant of this sweep"),
    ("+inject_slowdown.full=0.5", "must be >= 1"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_input_is_refused_before_anything_runs(tmp_path, override, message):
    out = tmp_path / "results"
    with pytest.raises(ConfigError, match=message):
        run(compose_cfg(*TINY, f"results_dir={out}", override))
    assert not out.exists()


def test_a_new_run_never_writes_into_an_old_one(tiny_run):
    before = (tiny_run / "results.csv").read_text()
    cfg = tiny(tiny_run.parent, "sweep.variants=[full,sdpa_math,xformers]", "run_id=tiny")
    with pytest.raises(ConfigError, match="already holds a run; pass resume=tiny"):
        run(cfg)
    assert (tiny_run / "results.csv").read_text() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        run(compose_cfg(*TINY, f"results_dir={tmp_path / 'r'}", "device=cuda"))


@pytest.mark.parametrize(
    "override,message",
    [("sweep.variants=[nope]", "available: "), ("sweep.nope=1", "Key 'nope' not in")],
)
def test_command_line_refuses_cleanly(tmp_path, override, message):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "harness", override, f"results_dir={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()


# --- the accuracy hook ------------------------------------------------------------------------
def test_task_rows_land_in_the_same_results(tmp_path, monkeypatch):
    import types
    from importlib.machinery import ModuleSpec

    seen = []

    def run_task(*, task, preset, variant_names, variant_options, device, done):
        seen.append(set(done))
        for name in variant_names:
            if (task, name, 64, 0) not in done:
                yield {"kind": "accuracy", "task": task, "variant": name, "seq_len": 64,
                       "seed": 0, "accuracy": 0.5, "status": "ok",
                       "options": variant_options[name]}  # fmt: skip

    fake = types.ModuleType("harness.tasks")
    fake.__spec__ = ModuleSpec("harness.tasks", None)
    fake.run_task, fake.TASKS = run_task, ("mqar",)
    monkeypatch.setitem(sys.modules, "harness.tasks", fake)
    cfg = tiny(tmp_path, "task=mqar", "sweep.variants=[full,local]", "run_id=t")
    rows = read_rows(run(cfg))
    assert [(r["kind"], r["task"], r["variant"]) for r in rows] == [
        ("accuracy", "mqar", "full"),
        ("accuracy", "mqar", "local"),
    ]
    assert all(r["run_id"] == "t" and r["git_commit"] for r in rows)
    run(tiny(tmp_path, "resume=t"))
    assert seen[-1] == {("mqar", "full", 64, 0), ("mqar", "local", 64, 0)}
    assert len(read_rows(tmp_path / "t")) == 2
    with pytest.raises(ConfigError, match="unknown task"):
        run(tiny(tmp_path, "task=nope"))


def test_task_runs_keep_the_presets_options_unless_a_config_sets_one():
    """conf/variant's defaults must not undo a task preset's length-scaled options."""
    assert sweep.set_options("local", {"seed": 0, "window": 128}) == {}
    assert sweep.set_options("local", {"seed": 0, "window": 8}) == {"window": 8}
    assert sweep.set_options("sparse", {"pattern": "bigbird", "block_size": 64}) == {
        "pattern": "bigbird"
    }


def test_shape_order_puts_every_variant_of_a_shape_together():
    cfg = compose_cfg("sweep=regress")
    cells = sweep.grid(validate.check(cfg), cfg.sweep)
    shapes = [(c["seq_len"], c["causal"], c["pass"]) for c in cells]
    runs = [s for i, s in enumerate(shapes) if i == 0 or s != shapes[i - 1]]
    assert len(runs) == len(set(shapes))  # each shape is one unbroken run of cells
    assert len({c["variant"] for c in cells if (c["seq_len"], c["pass"]) == shapes[0][::2]}) > 5


def test_rounds_pool_their_samples():
    ok = lambda ms: {"status": "ok", "samples_ms": " ".join(map(str, ms)), "flops": 10**6}
    first = sweep.pool_rounds(None, ok([1.0, 1.1]) | {"peak_mem_mb": 5.0})
    both = sweep.pool_rounds(first, ok([3.0, 1.2, 0.9]) | {"peak_mem_mb": 7.0})
    assert both["samples_ms"].split() == ["1", "1.1", "3", "1.2", "0.9"]
    assert both["latency_ms"] == pytest.approx(1.1) and both["peak_mem_mb"] == 7.0
    failed = {"status": "timeout", "reason": "slow"}
    assert sweep.pool_rounds(both, failed) is failed

"""The harness end to end: configs compose, sweeps write every row, failures are rows, resume
measures nothing twice, the measurements agree with the variants' own models."""

from __future__ import annotations

import csv
import fcntl
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import harness.config as hconfig
import variants
from harness import allocator, cell, measure, results, sweep, validate
from harness.results import row_key
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
    """The rows as written (rounds apart), read with plain csv, independent of harness.results."""
    with (run_dir / "results.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def keys(rows) -> list[tuple]:
    return [tuple(r[c] for c in CELL_KEY) for r in rows]


# --- test-only variants: module-level so a spawned worker can unpickle and register them -------
class _Small(variants.Attention):
    def flops(self, *, batch, heads, seq_len, head_dim, causal=False, backward=False, **_):
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
            cols = ("latency_ms", "latency_iqr_ms", "peak_mem_mb", "rss_peak_mb", "flops")
            for col in (*cols, "gflops_per_s", "model_mem_mb"):
                assert float(r[col]) >= 0, col
            assert r["kv_heads"] == r["heads"] == "1" and r["round"] == "0"
            for col in ("run_id", "git_commit", "torch_version", "threads", "cpu", "timestamp"):
                assert r[col], col
        # FlopCounterMode sees the matmuls of the forward: equal to the analytic count
        assert by[(name, "fwd")]["counted_flops"] == by[(name, "fwd")]["flops"]
    meta = json.loads((tiny_run / "meta.json").read_text())
    assert meta["matmul_peak_gflops"]["float32"] > 0
    assert meta["config"]["sweep"]["seq_lens"] == [32]
    assert meta["allocator"] == "cached" and meta["finished"]


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


def dense_scores_mb(n: int, heads: int) -> float:
    """What unchunked full's forward must hold at least: the n x n float32 scores of every
    head and the output (softmax in place); the review measured 48 MB where this is 17."""
    return (heads * n * n * 4 + heads * n * 64 * 4) / 2**20


def check_dense_peak(row: dict, n: int, heads: int) -> None:
    """Tensor bytes: at least the scores, at most one more n x n matrix per head, and the
    variant's model within 3%."""
    measured, floor = float(row["peak_mem_mb"]), dense_scores_mb(n, heads)
    assert floor * 0.999 <= measured <= floor + heads * n * n * 4 / 2**20 * 1.001, measured
    assert abs(measured - float(row["model_mem_mb"])) / measured < 0.03, row["model_mem_mb"]


def test_cpu_peak_memory_of_full_is_its_tensor_bytes(failures_run):
    row = failures_run["full"]
    check_dense_peak(row, 2048, 4)
    assert float(row["rss_peak_mb"]) > 0  # what the OS saw, beside it


@pytest.mark.parametrize("n", [1024, 2048])
def test_cpu_memory_does_not_depend_on_the_malloc(tmp_path, n):
    """The review's case: full at n=1024 measured 48 MB under stock glibc against a 33 MB
    model. Tensor bytes are the same under every malloc setting, and equal the count."""
    peaks = {}
    for setting in ("system", "cached"):
        cfg = tiny(
            tmp_path / setting,
            "sweep.variants=[full]",
            f"sweep.seq_lens=[{n}]",
            "sweep.num_heads=[4]",
            "sweep.head_dims=[64]",
            "sweep.passes=[fwd]",
            f"device.allocator={setting}",
        )
        (row,) = read_rows(run(cfg))
        peaks[setting] = float(row["peak_mem_mb"])
        check_dense_peak(row, n, 4)
    assert abs(peaks["system"] - peaks["cached"]) / peaks["cached"] < 0.02, peaks


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
    assert json.loads((run_dir / "meta.json").read_text())["allocator_in_use"] == "jemalloc"
    row = {r["variant"]: r for r in read_rows(run_dir)}["full"]
    check_dense_peak(row, 2048, 4)
    # the process mark too: jemalloc's cache is purged around the measured call
    measured = float(row["peak_mem_mb"])
    assert abs(float(row["rss_peak_mb"]) - measured) / measured < 0.15


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


def test_injected_slowdown_selects_passes_and_causal_cells():
    cfg = compose_cfg(
        "sweep=regress", "+inject_slowdown={local:1.5,local@fwd_bwd:2.0,sparse-causal:1.3}"
    )
    plan = validate.check(cfg)
    factors = {}
    for c in sweep.grid(plan, cfg.sweep):
        factors.setdefault((c["variant"], c["pass"], c["causal"]), plan.slowdown_of(c))
    assert factors[("local", "fwd", False)] == 1.5
    assert factors[("local", "fwd_bwd", True)] == 3.0  # both selectors: the factors multiply
    assert factors[("sparse", "fwd", True)] == 1.3 and factors[("sparse", "fwd", False)] == 1.0
    assert factors[("full", "fwd_bwd", True)] == 1.0
    with pytest.raises(ConfigError, match="after @ give one of"):
        validate.check(compose_cfg("+inject_slowdown={local@bwd:1.5}"))


def start_sweep(overrides: list[str]) -> subprocess.Popen:
    log = tempfile.TemporaryFile(mode="w+")  # a pipe would fill up with progress bars
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", *overrides],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    proc.log = log
    return proc


def wait_for_lines(path: Path, lines: int, proc, timeout=120) -> None:
    """Until results.csv has ``lines`` lines; a sweep that exits first fails, saying why."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return
        time.sleep(0.02)
    if proc.poll() is not None:
        proc.log.seek(0)
        pytest.fail(f"the sweep exited ({proc.returncode}) first: {proc.log.read()[-2000:]}")


@pytest.mark.slow
def test_kills_at_several_moments_then_resumes_give_every_row_once(tmp_path):
    """SIGKILL after 0, 1, 3 and 5 rows (rounds: rows of one cell in different rounds), a
    SIGTERM, each followed by a resume; at the end every (cell, round) is there exactly once,
    no line is torn, and the pooled table equals the plan of an uninterrupted run."""
    overrides = [*TINY, "sweep.variants=[full,sdpa_math]", "sweep.seq_lens=[32,64]"]
    overrides += ["sweep.min_run_time=0.2", "sweep.rounds=2", f"results_dir={tmp_path}"]
    csv_path = tmp_path / "k" / "results.csv"
    for i, (rows, sig) in enumerate([(1, "KILL"), (2, "KILL"), (4, "TERM"), (6, "KILL")]):
        proc = start_sweep([*overrides, "run_id=k" if i == 0 else "resume=k"])
        wait_for_lines(csv_path, rows, proc)
        os.killpg(proc.pid, getattr(signal, f"SIG{sig}"))
        proc.wait(60)
        if sig == "TERM":  # stopped in order: the run says it was interrupted
            meta = json.loads((tmp_path / "k" / "meta.json").read_text())
            assert (meta.get("resumes") or [meta])[-1].get("interrupted")
            assert results.read_run(tmp_path / "k").status == "interrupted"
    run(compose_cfg(*overrides, "resume=k"))
    assert csv_path.read_text().endswith("\n")
    written = read_rows(tmp_path / "k")
    per_round = [(*k, r["round"]) for k, r in zip(keys(written), written, strict=True)]
    assert len(per_round) == len(set(per_round)) == 16  # 8 cells x 2 rounds, each once
    cfg = compose_cfg(*overrides, "run_id=fresh")  # the plan of a new run
    expected = [row_key(sweep.cell_row(c))[1:] for c in sweep.grid(validate.check(cfg), cfg.sweep)]
    pooled = results.read_run(tmp_path / "k").rows
    assert sorted(tuple(results.key_text(x) for x in r) for r in pooled[CELL_KEY].values) == sorted(
        expected
    )
    assert set(pooled["status"]) == {"ok"} and results.read_run(tmp_path / "k").status == "ok"


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


def test_merged_blocks_are_the_means_of_consecutive_runs_of_blocks():
    assert measure.merge_blocks([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 3) == [2.0, 4.5, 6.5]
    assert measure.merge_blocks([1.0, 2.0], 3) == [1.0, 2.0]


def test_a_fast_cell_timed_for_long_keeps_a_bounded_number_of_samples(monkeypatch):
    """CI once wrote a samples_ms over csv's 128 kB field limit (a 6 s cell of microseconds),
    and the sweep failed reading its own results back."""
    timed = []  # the blocks as timed, before the cap

    def spied(*args):
        timed[:] = real(*args)
        return list(timed)

    real = measure._timed_blocks
    monkeypatch.setattr(measure, "_timed_blocks", spied)
    monkeypatch.setattr(measure, "MAX_BLOCKS", 3)
    got = measure.time_fn(lambda: None, threads=1, min_run_time=0.3, min_blocks=2)
    assert len(timed) > 3 and len(got) == 3  # merging happened (about 7 blocks here), to the cap
    assert min(timed) <= min(got) <= max(got) <= max(timed)  # means of the timed blocks
    few = measure.time_fn(lambda: None, threads=1, min_run_time=0.01, min_blocks=8)
    assert len(few) >= 8  # min_blocks outranks the cap


def test_a_results_field_longer_than_csv_allows_by_default_is_read(tmp_path):
    long = " ".join(["0.00123"] * 30_000)  # 240 kB, as written before samples were bounded
    table = results.ResultsFile(tmp_path / "results.csv")
    table.append({"kind": "speed", "variant": "full", "status": "ok", "samples_ms": long})
    assert [r["samples_ms"] for r in table.rows()] == [long]
    assert len(results.samples(results.read_run(tmp_path).rows["samples_ms"].iloc[0])) == 30_000


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
    ("device.allocator=tcmalloc2", "unknown; use cached, system, jemalloc"),
    ("+inject_slowdown.nope=1.5", "not a variant of this sweep"),
    ("+inject_slowdown.full=0.5", "must be >= 1"),
    ("+no_such_key=1", "unknown key 'no_such_key'; the top-level keys are: .*sweep"),
    ("sweep.kv_heads=[3]", "num_heads=1 is not a multiple of kv_heads=3"),
    ("sweep.passes=[decode,bwd]", "unknown pass"),
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
    [
        ("sweep.variants=[nope]", "available: "),
        ("sweep.nope=1", "Key 'nope' not in"),
        ("+no_such_key=1", "unknown key 'no_such_key'"),
    ],
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


@pytest.mark.slow
def test_a_run_elsewhere_puts_its_report_beside_its_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no reports/ may appear in the current directory
    out = tmp_path / "somewhere"
    proc = subprocess.run(
        [sys.executable, "-m", "harness", *TINY[:-1], "sweep.variants=[full]", f"results_dir={out}",
         "run_id=r"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "r" / "report" / "index.html").is_file()
    assert not (tmp_path / "reports").exists()
    assert f"report: {out / 'r' / 'report' / 'index.html'}" in proc.stdout


def test_shape_order_puts_every_variant_of_a_shape_together():
    cfg = compose_cfg("sweep=regress")
    cells = sweep.grid(validate.check(cfg), cfg.sweep)
    shapes = [(c["seq_len"], c["causal"], c["pass"]) for c in cells]
    runs = [s for i, s in enumerate(shapes) if i == 0 or s != shapes[i - 1]]
    assert len(runs) == len(set(shapes))  # each shape is one unbroken run of cells
    assert len({c["variant"] for c in cells if (c["seq_len"], c["pass"]) == shapes[0][::2]}) > 5


def test_rounds_pool_their_samples():
    ok = lambda r, ms, peak: {"kind": "speed", "variant": "v", "status": "ok", "round": r,
                              "samples_ms": " ".join(map(str, ms)), "flops": "1000000",
                              "peak_mem_mb": peak}  # fmt: skip
    (both,) = results.pool([ok(0, [1.0, 1.1], 5.0), ok(1, [3.0, 1.2, 0.9], 7.0)])
    assert both["samples_ms"].split() == ["1", "1.1", "3", "1.2", "0.9"]
    assert float(both["latency_ms"]) == pytest.approx(1.1) and float(both["peak_mem_mb"]) == 7
    timeout = {"kind": "speed", "variant": "v", "status": "timeout", "round": 2, "reason": "slow"}
    (kept,) = results.pool([ok(0, [1.0, 1.1], 5.0), ok(1, [3.0, 1.2, 0.9], 7.0), timeout])
    assert kept["status"] == "ok" and kept["samples_ms"] == both["samples_ms"]  # never replaced
    assert "2 of 3 rounds" in kept["reason"] and "timeout" in kept["reason"]


def test_an_explicitly_named_variant_beats_a_presets_exclude():
    plan = validate.check(compose_cfg("sweep=ci", "sweep.variants=[local,flex_local]"))
    assert [e.name for e in plan.entries] == ["local", "flex_local"]
    plan = validate.check(compose_cfg("sweep=ci", "sweep.variants=[local,'flex_*']"))
    assert [e.name for e in plan.entries] == ["local"]  # a pattern is thinned by the exclude


def test_grouped_heads_and_decode_cells(tmp_path):
    cfg = tiny(
        tmp_path,
        "sweep.variants=[full,linformer]",
        "sweep.num_heads=[4]",
        "sweep.kv_heads=[null,2]",
        "sweep.seq_lens=[64]",
        "sweep.passes=[fwd,decode]",
    )
    rows = {(r["variant"], r["kv_heads"], r["pass"]): r for r in read_rows(run(cfg))}
    assert set(rows) == {(v, kv, p) for v in ("full", "linformer") for kv in "42" for p in
                         ("fwd", "decode")}  # fmt: skip
    step = rows[("full", "2", "decode")]
    assert step["status"] == "ok", step["reason"]
    assert step["causal"] == "True"
    # the KV cache of 64 tokens: k and v, 2 key/value heads, d 16, float32
    assert float(step["cache_mb"]) == pytest.approx(2 * 2 * 64 * 16 * 4 / 2**20)
    assert float(step["flops"]) == 2 * 4 * 65 * 2 * 16  # 4 query heads, 65 keys, q.k and p.v
    assert rows[("linformer", "4", "decode")]["status"] == "unsupported"


def test_decode_steps_are_timed_from_one_state():
    """The timed call repeats one decode step at context n: the state it is given is not
    changed, so the 100th call sees n tokens, as the first."""
    spec = dict(variant="full", options={}, device="cpu", dtype="float32", batch=1, heads=2,
                kv_heads=2, seq_len=32, head_dim=8, causal=True, seed=0)  # fmt: skip
    spec["pass"] = "decode"
    attn = cell.build(spec)
    step, info = cell.timed_step(attn, spec)
    outs = [step()[1].length for _ in range(5)]
    assert outs == [33] * 5 and info["cache_mb"] > 0


# --- run folders: locks, kills, full disks ----------------------------------------------------
def test_a_held_run_folder_is_refused_at_once_naming_its_holder(tiny_run, tmp_path):
    with results.RunLock(tmp_path / "held"):
        start = time.time()
        with pytest.raises(results.RunLocked, match=f"pid {os.getpid()}"):
            with results.RunLock(tmp_path / "held"):
                pass
        assert time.time() - start < 5
    with results.RunLock(tmp_path / "held"):  # released: taken again
        pass


def test_a_sweep_starting_while_a_reader_probes_the_lock_is_not_refused(tmp_path):
    """locked() (a report reading run status) takes the flock for a moment; a sweep that
    starts in that moment waits it out instead of failing as if another sweep held it."""
    (tmp_path / "r").mkdir()
    probe = os.open(tmp_path / "r" / results.LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(probe, fcntl.LOCK_EX)  # a probe caught mid-way, held longer than any real one
    threading.Timer(0.3, os.close, [probe]).start()
    with results.RunLock(tmp_path / "r"):
        assert results.locked(tmp_path / "r")
    assert not results.locked(tmp_path / "r")


@pytest.mark.slow
def test_resume_of_a_run_another_sweep_holds_exits_within_seconds(tmp_path):
    overrides = [*TINY, "sweep.variants=[full]", "sweep.min_run_time=6", f"results_dir={tmp_path}"]
    first = start_sweep([*overrides, "run_id=h"])  # 2 cells of 6 s: the second comes mid-run
    try:
        wait_for_lines(tmp_path / "h" / "results.csv", 1, first)  # holding the lock, mid-run
        start = time.time()
        second = subprocess.run(
            [sys.executable, "-m", "harness", *overrides, "resume=h"], cwd=ROOT,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode != 0 and time.time() - start < 30, second.stderr
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        first.wait(timeout=300)
        first.log.seek(0)
        log = first.log.read()[-3000:]
        assert first.returncode == 0, log
        meta = json.loads((tmp_path / "h" / "meta.json").read_text())
        assert "resumes" not in meta and meta.get("finished"), (meta, log)  # nothing written
        assert len(read_rows(tmp_path / "h")) == 2  # each row once
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_torn_header_and_torn_rows_are_never_rows(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("")  # a kill while the header was being written
    table = results.ResultsFile(path)
    assert path.read_text().splitlines()[0].split(",") == COLUMNS
    row = {"kind": "speed", "variant": "full", "status": "ok", "samples_ms": "1 2 3"}
    table.append(row)
    with path.open("a") as f:
        f.write("speed,full,{},cpu,float32,1,1,1,32,16,False,fwd,o")  # cut by a kill
    assert len(results.ResultsFile(path).rows()) == 1  # the writer cuts it off
    with path.open("a") as f:
        f.write("speed,sparse,{},cpu")
    run = results.read_run(tmp_path)  # a reader ignores it, and says the run is unfinished
    assert list(run.rows["variant"]) == ["full"]
    (tmp_path / "meta.json").write_text(json.dumps({"run_id": "x", "started": "then"}))
    assert results.read_run(tmp_path).status == "interrupted"


def test_a_full_disk_keeps_every_row_written_before(tmp_path):
    """RLIMIT_FSIZE makes the write fail as a full disk would: a clear error, nothing lost."""
    code = f"""
import resource, sys
from harness import results
table = results.ResultsFile({str(tmp_path / "results.csv")!r})
table.append({{"kind": "speed", "variant": "full", "status": "ok"}})
size = {len(",".join(COLUMNS)) + 400}
resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
try:
    for i in range(100):
        table.append({{"kind": "speed", "variant": f"v{{i}}", "status": "ok", "reason": "x" * 50}})
except OSError as e:
    print("ERROR", e)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    quiet = lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, preexec_fn=quiet
    )
    assert "ERROR could not write a row" in proc.stdout and "resume the run" in proc.stdout
    rows = results.ResultsFile(tmp_path / "results.csv").rows()
    assert rows[0]["variant"] == "full" and all(r["status"] == "ok" for r in rows)


def test_git_commit_is_dirty_for_code_and_clean_for_output_folders(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "results" / "run").mkdir(parents=True)
    (repo / "results" / "run" / "results.csv").write_text("a\n")
    (repo / "code.py").write_text("x = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    monkeypatch.setattr(results, "REPO", repo)
    head = results.git_commit()
    assert len(head) == 40 and not head.endswith("+dirty")
    shutil.rmtree(repo / "results" / "run")  # a run replacing its committed folder
    assert results.git_commit() == head
    (repo / "code.py").write_text("x = 2\n")
    assert results.git_commit() == head + "+dirty"


def test_a_run_stopped_as_its_results_file_opens_is_resumable(tmp_path, monkeypatch):
    """meta.json is written before results.csv's first line: a sweep stopped at that moment
    (the old order left a header without meta.json, which no resume could read) resumes."""
    overrides = ["sweep.variants=[full]", "sweep.passes=[fwd]"]

    def stopped(path):
        raise KeyboardInterrupt  # the kill, at the moment the results file would be opened

    monkeypatch.setattr(sweep.res, "ResultsFile", stopped)
    with pytest.raises(KeyboardInterrupt):
        run(tiny(tmp_path, *overrides, "run_id=s"))
    assert (tmp_path / "s" / "meta.json").is_file()
    monkeypatch.undo()
    run(tiny(tmp_path, *overrides, "resume=s"))
    rows = read_rows(tmp_path / "s")
    assert [(r["variant"], r["pass"], r["status"]) for r in rows] == [("full", "fwd", "ok")]

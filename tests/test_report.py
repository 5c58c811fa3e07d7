"""The report renders from synthetic run folders (written through harness.results, as the sweep
writes them): every section, offline, never crashing, and with the numbers the rows imply."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.report import render
from harness.report.page import SECTION_ERROR, SECTIONS
from harness.results import ResultsFile, RunLock, write_meta

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = (256, 512, 1024, 2048, 4096)
SMALL = {"lengths": (256, 1024), "growth": ("sdpa", "full")}  # few figures: a quick render
# variant -> (ms at n=1024 fwd, time exponent, MB at n=1024, memory exponent)
GROWTH = {
    "sdpa": (1.0, 2.0, 4.0, 1.0),
    "sdpa_math": (2.0, 2.0, 16.0, 2.0),
    "full": (2.5, 2.0, 16.0, 2.0),
    "local": (1.5, 1.0, 2.0, 1.0),
    "linear": (3.0, 1.0, 1.0, 1.0),
}
SHAPE = {"dtype": "float32", "batch": 1, "heads": 4, "head_dim": 32}
# task -> (full's accuracy, {variant: accuracy drop}): linear within 2 points of full, local not
TASKS = {
    "mqar": (0.90, {"full": 0.0, "local": 0.15, "linear": 0.005}),
    "listops": (0.37, {"full": 0.0, "local": 0.15, "linear": 0.004}),
}
TASK_OPTIONS = {"local": {"window": 8}, "linear": {}, "full": {}}


# --- synthetic rows -------------------------------------------------------------------------------
def speed_rows(rng, device="cpu", lengths=LENGTHS, growth=None, causal=(False,), scale=1.0):
    """fwd and fwd_bwd rows growing as GROWTH says (raw samples with log-normal noise), an
    OOM cell and an unsupported variant."""
    growth = GROWTH if growth is None else {v: GROWTH[v] for v in growth}
    rows = []
    for variant, model in growth.items():
        for c in causal:
            for n in lengths:
                for pss in ("fwd", "fwd_bwd"):
                    cell = _cell(variant, device, n, pss, causal=c)
                    if variant == "full" and pss == "fwd_bwd" and n == lengths[-1] > 1024:
                        rows.append(cell | {"status": "oom", "reason": f"out of memory at {n}"})
                        continue
                    factor = scale * (0.5 if c else 1) * (3.5 if pss == "fwd_bwd" else 1)
                    rows.append(cell | _timing(rng, model, n, factor))
    rows += [
        _cell("xformers", device, n, "fwd")
        | {"status": "unsupported", "reason": "xformers has CUDA kernels only"}
        for n in lengths
    ]
    return rows


def _cell(variant, device, n, pss, causal=False, kv_heads=4, options=None) -> dict:
    return {
        "kind": "speed",
        "variant": variant,
        "options": options or {"seed": 0},
        "device": device,
        **SHAPE,
        "kv_heads": kv_heads,
        "seq_len": n,
        "causal": causal,
        "pass": pss,
    }


def _timing(rng, model, n, factor, samples=12) -> dict:
    """Raw samples around t0 (n/1024)^p, memory m0 (n/1024)^pm, and what follows from them."""
    t0, p, m0, pm = model
    raw = t0 * (n / 1024) ** p * factor * rng.lognormal(0, 0.03, samples)
    med, (q1, q3) = float(np.median(raw)), np.percentile(raw, [25, 75])
    flops = int(4 * 4 * 32 * n * n * factor)
    return {
        "status": "ok",
        "latency_ms": med,
        "latency_iqr_ms": q3 - q1,
        "noisy": (q3 - q1) / med > 0.1,
        "samples_ms": " ".join(f"{x:.5f}" for x in raw),
        "peak_mem_mb": m0 * (n / 1024) ** pm,
        "model_mem_mb": m0 * (n / 1024) ** pm,
        "flops": flops,
        "gflops_per_s": flops / (med * 1e6),
    }


# variant -> (ms per token at n=1024, exponent; cache MB at 1024, exponent)
DECODE = {
    "sdpa": (0.2, 1.0, 1.0, 1.0),
    "full": (0.3, 1.0, 1.0, 1.0),
    "local": (0.5, 0.0, 0.25, 0.0),
    "linear": (0.8, 0.0, 0.06, 0.0),
}
DECODE_LENGTHS = (1024, 4096, 16384, 65536)


def decode_rows(rng, device="cpu"):
    """One decode step at each context: KV caches grow with n, local/linear states do not;
    kv_heads 4 (all heads) and 1 (multi-query: a quarter of the cache)."""
    rows = []
    for variant, (t0, p, c0, pc) in DECODE.items():
        for kv in (4, 1):
            for n in DECODE_LENGTHS:
                t = t0 * (n / 1024) ** p * (0.7 if kv == 1 else 1) * rng.lognormal(0, 0.02, 8)
                cache = c0 * (n / 1024) ** pc * kv / 4
                rows.append(
                    _cell(variant, device, n, "decode", True, kv)
                    | {
                        "status": "ok",
                        "latency_ms": float(np.median(t)),
                        "samples_ms": " ".join(f"{x:.5f}" for x in t),
                        "cache_mb": cache,
                        "peak_mem_mb": cache / 10,
                        "flops": 1000,
                    }
                )
    return rows


TRAIN_LENGTHS = (1024, 2048, 3072, 4096)
MODEL = {"d_model": 64, "layers": 2, "heads": 4, "mlp": 128}


def train_rows(device="cpu", task="text", options=None, lengths=TRAIN_LENGTHS):
    """Training steps: attention is part of the step, so a variant's win shrinks in a model."""
    rows = []
    for variant, (t0, p, m0, _) in GROWTH.items():
        if variant.startswith("sdpa"):
            continue
        for n in lengths:
            ms = 50 + 10 * t0 * (n / 1024) ** p  # the rest of the model costs the same for all
            rows.append(
                {
                    "kind": "train_step",
                    "task": task,
                    "variant": variant,
                    "options": (options or {}).get(variant, {"seed": 0}),
                    "device": device,
                    "dtype": "float32",
                    "batch": 4,
                    "seq_len": n,
                    "model": MODEL,
                    "status": "ok",
                    "latency_ms": ms,
                    "steps_per_s": 1000 / ms,
                    "tokens_per_s": 4 * n * 1000 / ms,
                    "peak_mem_mb": 100 + m0 * n / 1024,
                    "state_mb": 3.0,
                }
            )
    return rows


def accuracy_rows(rng, device="cpu", seeds=(0, 1, 2), train_speed=False):
    """Three seeds per task and variant, a one-seed variant, a diverged run, approx errors;
    ``train_speed``: the task run's train_step rows of the very options trained."""
    base = {"device": device, "dtype": "float32", "status": "ok"}
    rows = []
    for task, (acc, drops) in TASKS.items():
        n = 256 if task == "mqar" else 512
        for variant, drop in drops.items():
            opts = TASK_OPTIONS[variant]
            for seed in seeds:
                rows.append(
                    base
                    | {
                        "kind": "accuracy",
                        "task": task,
                        "variant": variant,
                        "options": opts,
                        "seq_len": n,
                        "seed": seed,
                        "accuracy": acc - drop + rng.normal(0, 0.004),
                        "val_accuracy": acc,
                        "best_step": 90,
                        "steps": 100,
                        "stopped": "max_steps",
                        "train_s": 5.0,
                        "params": 1000,
                    }
                )
        rows.append(
            base
            | {
                "kind": "accuracy",
                "task": task,
                "variant": "reformer",
                "options": {"bucket_size": 8},
                "seq_len": n,
                "seed": 0,
                "accuracy": acc - 0.1,
                "stopped": "time",
            }
        )
        if train_speed:
            opts = {v: TASK_OPTIONS[v] for v in drops}
            rows += [r for r in train_rows(device, task, opts, (n,)) if r["variant"] in drops]
    rows.append(
        base
        | {
            "kind": "accuracy",
            "task": "listops",
            "variant": "linformer",
            "seq_len": 512,
            "seed": 0,
            "status": "error",
            "reason": "diverged (nan loss)",
        }
    )
    for variant, err in (("local", 0.3), ("linear", 0.6), ("full", 0.0)):
        for inp in ("random", "trained"):
            rows.append(
                base
                | {
                    "kind": "approx",
                    "task": "mqar",
                    "variant": variant,
                    "seq_len": 256,
                    "input": inp,
                    "seed": 0,
                    "approx_error": err,
                }
            )
    return rows


def write_run(
    folder: Path,
    rows,
    *,
    commit="a1b2c3d4e5f6",
    finished=True,
    patterns=None,
    meta=None,
    device="cpu",
    day=1,
) -> Path:
    """A run folder as the sweep leaves it: results.csv through ResultsFile, meta.json with
    the command that reproduces it, and (``patterns``) the patterns.json it recorded. Rows
    are stamped a second apart on ``day``."""
    folder.mkdir(parents=True, exist_ok=True)
    prov = {
        "run_id": folder.name,
        "git_commit": commit,
        "torch_version": "2.13.0",
        "threads": 2,
        "cpu": "Test CPU",
        "gpu": "Test GPU" if device == "cuda" else "",
    }
    table = ResultsFile(folder / "results.csv")
    for i, row in enumerate(rows):
        stamp = f"2026-01-{day:02d}T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}+0000"
        table.append(prov | {"timestamp": stamp} | row)
    info = (
        prov
        | {
            "device": device,
            "command": f"python -m harness run_id={folder.name}",
            "started": "2026-01-01T00:00:00+0000",
            "allocator": "jemalloc",
            "matmul_peak_gflops": {"float32": 120.0},
        }
        | (meta or {})
    )
    if finished:
        info["finished"] = "2026-01-01T01:00:00+0000"
    write_meta(folder, info)
    if patterns is not None:
        (folder / "patterns.json").write_text(json.dumps(patterns))
    return folder


def small_run(folder: Path, **kw) -> Path:
    return write_run(folder, speed_rows(np.random.default_rng(0), **SMALL), **kw)


def patterns_doc(n=16) -> dict:
    i, j = np.indices((n, n))
    enc = lambda m: ["".join("1" if x else "0" for x in row) for row in m]  # noqa: E731
    return {
        "format": 1,
        "n": n,
        "method": "autograd on a random input",
        "patterns": [
            {
                "variant": "full",
                "options": {},
                "causal": True,
                "method": "autograd",
                "visible": enc(j <= i),
                "note": "",
            },
            {
                "variant": "local",
                "options": {"window": 2},
                "causal": False,
                "method": "autograd",
                "visible": (abs(i - j) <= 2).astype(int).tolist(),
                "note": "",
            },
            {
                "variant": "local",
                "options": {"window": 4},
                "causal": False,
                "method": "autograd",
                "visible": enc(abs(i - j) <= 4),
                "note": "",
            },
            {
                "variant": "xformers",
                "options": {},
                "causal": False,
                "visible": None,
                "note": "unsupported on CPU: CUDA kernels only",
            },
        ],
    }


# --- checks ---------------------------------------------------------------------------------------
def assert_self_contained(page: str):
    """No network: no http(s) src/href, no external script; every image a decodable data: PNG."""
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*https?:""", page, re.I)
    assert "<script src" not in page.lower() and page.lower().count("<script") == 1
    srcs = re.findall(r"""<img[^>]*\ssrc="([^"]*)\"""", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for src in srcs:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def csv_of(page: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(page.parent / f"{name}.csv")


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """A CPU run (speed, decode, tasks with seeds, training step; dirty tree), a GPU run of
    another commit, in one report: every section has data."""
    root = tmp_path_factory.mktemp("results")
    rng = np.random.default_rng(0)
    cpu_rows = speed_rows(rng, causal=(False, True)) + decode_rows(rng) + train_rows()
    cpu_rows += accuracy_rows(rng, train_speed=True)
    cpu = write_run(root / "run-cpu", cpu_rows, commit="aaaaaaa111+dirty", patterns=patterns_doc())
    gpu = write_run(
        root / "run-gpu", speed_rows(rng, "cuda", scale=0.1), commit="bbbbbbb222", device="cuda"
    )
    page = render([cpu, gpu], tmp_path_factory.mktemp("reports"), reference="sdpa", name="both")
    return page, page.read_text()


def test_every_section_renders_offline(full_report):
    page, text = full_report
    assert page.name == "index.html" and page.parent.name == "both"
    assert SECTION_ERROR not in text
    for sid, title, _ in SECTIONS:
        assert f'id="{sid}"' in text and title in text
    assert_self_contained(text)
    assert text.index('id="summary"') < text.index('id="runs"') < text.index('id="kernel"')
    for name in (
        "runs",
        "leaderboard",
        "speed_cells",
        "speedup",
        "exponents",
        "crossover",
        "decode_cells",
        "decode_exponents",
        "decode_breakeven",
        "train_step",
        "accuracy",
        "accuracy_speed",
        "approx",
        "failures",
        "patterns",
    ):
        assert (page.parent / f"{name}.csv").is_file(), name


def test_summary_leaderboard_and_sentences(full_report):
    page, text = full_report
    board = csv_of(page, "leaderboard")
    assert set(board["machine"]) == {"cpu: Test CPU, 2 threads", "cuda: Test GPU"}
    cpu = board[board["machine"].str.startswith("cpu")].set_index("variant")
    assert np.isclose(cpu.loc["sdpa", "fwd \u00d7sdpa 4k"], 1.0)
    assert np.isclose(cpu.loc["local", "fwd \u00d7sdpa 4k"], 16 / 6, rtol=0.1)  # 16 ms vs 6 ms
    assert np.isclose(cpu.loc["full", "time exp fwd"], 2.0, atol=0.1)
    assert np.isclose(cpu.loc["linear", "acc mqar (%)"], 89.5, atol=1.0)
    assert np.isclose(cpu.loc["linear", "decode exp"], 0.0, atol=0.05)
    assert cpu.loc["linear", "train step \u00d7full 4k"] > 1
    assert 'class="sortable board"' in text and "<script>" in text
    # sdpa is fastest among the exact ones everywhere; local overtakes it past n = 1024 (fwd)
    assert "Fastest exact variant" in text and "fwd: sdpa at every length" in text
    assert "fwd: sdpa at 256-1k, local at 2k-4k" in text
    assert "Within 2 points of full&#x27;s mean accuracy on every task it trained" in text
    assert "linear is the fastest" in text


def test_runs_are_named_with_commit_and_command(full_report):
    page, text = full_report
    runs = csv_of(page, "runs").set_index("run")
    assert runs.loc["run-cpu", "command"] == "python -m harness run_id=run-cpu"
    assert bool(runs.loc["run-cpu", "dirty"]) and not bool(runs.loc["run-gpu", "dirty"])
    assert "UNCOMMITTED code" in text and 'class="dirty"' in text
    assert "cpu@aaaaaaa" not in text  # tables name runs, not hashes
    cells = csv_of(page, "speed_cells")
    assert set(cells["run"]) == {"run-cpu", "run-gpu"}


def test_kernel_exponents_and_crossovers(full_report):
    page, _ = full_report
    exp = csv_of(page, "exponents")
    exp = exp[~exp.config.str.contains("causal") & (exp["pass"] == "fwd")]
    t = exp[(exp.label == "local") & (exp.metric == "time")]
    assert np.allclose(t["exponent"], 1.0, atol=0.1)  # the synthetic growth is recovered
    q = exp[(exp.label == "full") & (exp.metric == "memory")]
    assert np.allclose(q["exponent"], 2.0, atol=0.05)
    cx = csv_of(page, "crossover")
    cx = cx[~cx.config.str.contains("causal") & (cx["pass"] == "fwd")]
    lin = cx[cx.label == "linear"]  # 3 (n/1024) vs (n/1024)^2: equal at n = 3072
    assert np.allclose(lin["crossover_n"], 3072, rtol=0.15)
    assert cx[cx.label == "full"]["verdict"].str.contains("not within").all()


def test_decode_exponents_breakeven_and_kv_heads(full_report):
    page, text = full_report
    exp = csv_of(page, "decode_exponents")
    cache = exp[exp.metric == "cache"].set_index(["kv", "label"])["exponent"]
    assert np.isclose(cache["kv_heads=4", "linear"], 0.0) and np.isclose(
        cache["kv_heads=4", "local"], 0
    )
    assert np.isclose(cache["kv_heads=4", "full"], 1.0, atol=0.02)
    assert np.isclose(cache["kv_heads=1", "sdpa"], 1.0, atol=0.02)
    be = csv_of(page, "decode_breakeven").set_index(["kv", "label"])
    assert be.loc[("kv_heads=4", "linear"), "state"] == "bounded"
    # linear 0.8 ms flat against sdpa 0.2 (n/1024): cheaper past n = 4096
    assert np.isclose(be.loc[("kv_heads=4", "linear"), "crossover_n"], 4096, rtol=0.2)
    assert "grows" in be.loc[("kv_heads=4", "full"), "state"]
    assert "kv_heads=1" in text and "kv_heads=4" in text


def test_training_step_beside_kernel_and_published(full_report):
    page, text = full_report
    t = csv_of(page, "train_step")
    t = t[t.task == "text"].set_index(["label", "seq_len"])
    assert np.isclose(t.loc[("full", 1024), "speedup"], 1.0)
    lin = t.loc[("linear", 2048)]
    assert 1 < lin["speedup"] < lin["kernel_x"]  # a kernel win shrinks in the model
    assert lin["kernel_vs_model"].startswith("kernel ") and ", model " in lin["kernel_vs_model"]
    assert t.loc[("linear", 3072), "kernel_vs_model"].startswith("no kernel row")  # not swept
    assert "Table 2" in text and "PUBLISHED" not in text.split('id="training"')[0]
    assert "model d_model=64,heads=4,layers=2,mlp=128, batch 4" in text


def test_seeds_mean_spread_and_verdicts(full_report):
    page, text = full_report
    acc = csv_of(page, "accuracy")
    mqar = acc[acc.task == "mqar"].set_index("label")
    assert (mqar.loc[["full", "local", "linear"], "seeds"] == 3).all()
    assert mqar.loc["linear", "vs_full"] == "cannot tell from full"
    assert mqar.loc["local", "vs_full"] == "below full"
    assert mqar.loc["reformer", "vs_full"] == "one seed: not ranked"
    assert mqar.loc["full", "vs_full"] == "reference"
    assert "Welch" in text and "+/-" in text


def test_accuracy_speed_from_the_training_step_of_the_trained_options(full_report):
    page, text = full_report
    joined = csv_of(page, "accuracy_speed")
    mqar = joined[(joined.task == "mqar") & joined.label.isin(["full", "local", "linear"])]
    assert mqar["model_x"].notna().all() and mqar["speed_from"].str.startswith("training").all()
    assert "Published" in text.split('id="accuracy"')[1]


def test_accuracy_speed_falls_back_to_kernel_rows_by_family(tmp_path):
    rng = np.random.default_rng(1)
    run = write_run(tmp_path / "r", speed_rows(rng, lengths=(256, 1024)) + accuracy_rows(rng))
    page = render([run], tmp_path / "out", patterns=False)
    joined = csv_of(page, "accuracy_speed")
    local = joined[(joined.task == "mqar") & (joined.label == "local")].iloc[0]
    assert local["kernel_label"] == "local" and local["kernel_n"] == 256
    assert local["speed_from"].startswith("kernel fwd_bwd, matched by family")


def test_patterns_come_from_the_run(full_report, tmp_path):
    page, text = full_report
    pats = csv_of(page, "patterns").set_index("label")
    assert np.isclose(pats.loc["full", "visible_fraction"], (16 * 17 / 2) / 256)
    assert (
        pats.loc["local[window=4]", "visible_fraction"]
        > pats.loc["local[window=2]", "visible_fraction"]
    )
    assert pd.isna(pats.loc["xformers", "visible_fraction"])
    assert "CUDA kernels only" in text
    bare = render([small_run(tmp_path / "r")], tmp_path / "out").read_text()
    assert "No run recorded attention patterns" in bare


def test_a_later_run_replaces_the_same_measurement(tmp_path):
    rng = np.random.default_rng(2)
    old = write_run(tmp_path / "old", speed_rows(rng, **SMALL))
    again = [r for r in speed_rows(rng, scale=2.0, **SMALL) if r["variant"] == "full"]
    new = write_run(tmp_path / "new", again, day=2)
    page = render([old, new], tmp_path / "out", patterns=False)
    cells = csv_of(page, "speed_cells")
    assert set(cells[cells.variant == "full"]["run"]) == {"new"}
    assert set(cells[cells.variant == "sdpa"]["run"]) == {"old"}
    runs = csv_of(page, "runs").set_index("run")
    assert runs.loc["old", "replaced_rows"] == "4 by new"


def test_interrupted_and_running_runs_are_flagged(tmp_path):
    stopped = small_run(tmp_path / "stopped", finished=False)
    busy = small_run(tmp_path / "busy")
    with RunLock(busy):
        text = render([stopped, busy], tmp_path / "out", patterns=False).read_text()
    assert "Run stopped was interrupted" in text and "Run busy is still running" in text


def test_old_format_results_still_render(tmp_path):
    """A results.csv from before kv_heads, decode and train_step (the committed runs' format)."""
    old = tmp_path / "old"
    old.mkdir()
    header = (
        "kind,variant,options,device,dtype,batch,heads,seq_len,head_dim,causal,pass,status,"
        "reason,latency_ms,peak_mem_mb,task,accuracy,seed,run_id,git_commit"
    )
    lines = [
        f"speed,{v},{{}},cpu,float32,1,8,{n},64,False,fwd,ok,,{t * n / 1024},{n / 100},,,,old,abc"
        for v, t in (("sdpa", 1), ("full", 2))
        for n in (1024, 2048, 4096)
    ]
    lines.append("accuracy,full,{},cpu,float32,,,64,,,,ok,,,,mqar,0.99,0,old,abc")
    (old / "results.csv").write_text("\n".join([header, *lines]) + "\n")
    text = render([old], tmp_path / "out", patterns=False).read_text()
    assert SECTION_ERROR not in text and "No decode rows" in text and "No train_step rows" in text
    assert "predates meta.json" in text


@pytest.mark.parametrize(
    "case",
    ["single_length", "all_unsupported", "no_reference", "empty_folder", "error_rows_only"],
)
def test_partial_data_does_not_crash(tmp_path, case):
    rows = speed_rows(np.random.default_rng(0), **SMALL)
    keep = {
        "single_length": lambda r: r["seq_len"] == 1024,
        "all_unsupported": lambda r: r["variant"] == "xformers",
        "no_reference": lambda r: r["variant"] != "sdpa",
        "empty_folder": lambda r: False,
        "error_rows_only": lambda r: r.get("status") != "ok",
    }[case]
    run = write_run(tmp_path / "r", [r for r in rows if keep(r)])
    if case == "empty_folder":
        for f in run.iterdir():
            f.unlink()
    text = render([run], tmp_path / "out", patterns=False).read_text()
    assert SECTION_ERROR not in text
    if case in ("all_unsupported", "empty_folder", "error_rows_only"):
        assert "FAILED" in text
    if case == "no_reference":
        assert "has no ok speed rows: no speedups" in text


def test_failed_multirun_job_is_shown(tmp_path):
    good = small_run(tmp_path / "multi" / "0")
    bad = tmp_path / "multi" / "1"
    bad.mkdir(parents=True)
    (bad / "FAILED").write_text("RuntimeError: CUDA error: device-side assert\n")
    text = render([tmp_path / "multi"], tmp_path / "out", patterns=False).read_text()
    assert "CUDA error: device-side assert" in text and "Run 1 FAILED" in text
    assert good.name in text and SECTION_ERROR not in text


def test_cli(tmp_path, capsys):
    from harness.report.__main__ import main

    run = small_run(tmp_path / "r1")
    assert main([str(run), "--out", str(tmp_path / "rep"), "--name", "x", "--no-patterns"]) == 0
    assert capsys.readouterr().out.strip().endswith("x/index.html")


BLOCKED = (
    "variants",
    "torch",
    "harness.cell",
    "harness.measure",
    "harness.sweep",
    "harness.worker",
)
NO_MEASURING_CODE = f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {BLOCKED!r}):
            raise ImportError("the report must not import " + name)
sys.meta_path.insert(0, Refuse())
from harness.report import render
page = render([sys.argv[1]], sys.argv[2], name="r")
assert {SECTION_ERROR!r} not in page.read_text()
print(sorted(m for m in sys.modules if m.split(".")[0] in ("variants", "torch")))
"""


def test_report_builds_from_results_alone(tmp_path):
    """Rebuilt with `import variants`, torch and the measuring modules made to fail."""
    rng = np.random.default_rng(3)
    rows = speed_rows(rng, **SMALL) + decode_rows(rng)[:4] + accuracy_rows(rng)[:3]
    run = write_run(tmp_path / "r", rows, patterns=patterns_doc())
    proc = subprocess.run(
        [sys.executable, "-c", NO_MEASURING_CODE, str(run), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


# --- the pieces -----------------------------------------------------------------------------------
def test_variant_labels_show_only_the_options_that_differ():
    from harness.report.load import variant_labels

    opts = lambda pattern: json.dumps({"block_size": 64, "pattern": pattern, "seed": 0})  # noqa: E731
    rows = pd.DataFrame(
        {
            "kind": ["speed"] * 4 + ["accuracy"] * 2,
            "task": [""] * 4 + ["mqar", "listops"],
            "variant": ["sparse", "sparse", "sparse", "local", "local", "local"],
            "options": [
                opts("fixed"),
                opts("bigbird"),
                opts("fixed"),
                json.dumps({"window": 8}),
                json.dumps({"window": 8}),
                json.dumps({"window": 16}),
            ],
        }
    )
    assert list(variant_labels(rows)) == [
        "sparse[pattern=fixed]",
        "sparse[pattern=bigbird]",
        "sparse[pattern=fixed]",
        "local",
        "local",
        "local",  # one option set per task: no suffix
    ]


def test_match_label_prefers_agreeing_options_then_the_first_measured():
    from harness.report.accuracy import match_label

    sets = {
        "sparse[pattern=fixed]": {"pattern": "fixed", "block_size": "64"},
        "sparse[pattern=bigbird]": {"pattern": "bigbird", "block_size": "64"},
    }
    assert match_label({"pattern": "bigbird", "block_size": 8}, sets) == "sparse[pattern=bigbird]"
    assert match_label({"block_size": 8}, sets) == "sparse[pattern=fixed]"


def test_welch_verdicts():
    from harness.report.accuracy import compare

    assert compare([90.0, 90.2, 89.9], [90.1, 89.8, 90.0], "full")[0] == "cannot tell from full"
    assert compare([70.0, 70.5, 69.8], [90.1, 89.8, 90.0], "full")[0] == "below full"
    assert compare([91.0, 91.0], [90.0, 90.0], "full")[0] == "above full"  # no spread, differ
    assert compare([90.0], [90.0, 91.0], "full")[0] == "one seed: not ranked"


def test_panels_hold_at_most_six_lines_and_colours_are_fixed():
    from harness.report.groups import colour
    from harness.report.plots import MAX_LINES, Looks, panel_sets

    names = [
        "sdpa",
        "sdpa_math",
        "sdpa_flash",
        "sdpa_efficient",
        "sdpa_cudnn",
        "xformers",
        "flex_full",
        "flex_local",
        "flex_sparse",
        "full",
        "local",
        "linear",
    ]
    groups = {"full": "exact", "local": "masking", "linear": "approximation"}
    df = pd.DataFrame(
        {"label": names, "variant": names, "group": [groups.get(n, "baselines") for n in names]}
    )
    sets = panel_sets(df, "sdpa")
    assert all(len(labels) <= MAX_LINES for _, labels in sets)
    assert [t for t, _ in sets] == [
        "exact, masking, approximation",
        "baselines (1)",
        "baselines (2)",
    ]
    assert sorted(lb for _, labels in sets for lb in labels) == sorted(set(names) - {"sdpa"})
    looks = Looks({"sparse[pattern=fixed]": "sparse", "sparse[pattern=bigbird]": "sparse"}, {})
    assert looks.colour("sparse[pattern=fixed]") == looks.colour("sparse[pattern=bigbird]")
    assert looks.line("sparse[pattern=fixed]")["ls"] != looks.line("sparse[pattern=bigbird]")["ls"]
    assert colour("full") != colour("local") and colour("mine") == colour("mine")


def test_published_table2_is_as_printed():
    from harness.report.published import lra_points, lra_table2

    t2 = lra_table2().set_index(["model", "seq_len"])
    assert t2.loc[("Performer", 4096), "steps_per_s"] == 8.0
    assert np.isclose(t2.loc[("Performer", 4096), "speedup"], 8.0 / 1.4)
    pts = lra_points("listops", 2000).set_index("model")
    assert pts.loc["Transformer", "accuracy"] == 36.37 and pts["n"].iloc[0] == 2048
    assert lra_points("mqar", 64).empty


def _browser_ready() -> bool:
    import importlib.util
    import shutil

    names = ("chromium", "chromium-browser", "google-chrome")
    has_browser = any(shutil.which(n) for n in names)
    return has_browser and importlib.util.find_spec("playwright") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _browser_ready(), reason="needs Chromium and playwright")
def test_page_in_headless_chromium_shows_every_plot_and_sorts(full_report, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import check_report

    page, _ = full_report
    shot = tmp_path / "page.png"
    images, problems = check_report.check_page(page, check_report.find_chromium(None), shot)
    assert images > 10 and problems == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rows_written_without_a_device_take_their_runs(tmp_path):
    """Task runs once wrote approx rows with no device: they belong to the run's machine, not
    to a machine of their own ("?: Test CPU") in the runs table and the approx section."""
    from harness.report.load import load

    rows = accuracy_rows(np.random.default_rng(0))
    rows = [r | {"device": ""} if r["kind"] == "approx" else r for r in rows]
    data = load([write_run(tmp_path / "t", rows)])
    assert set(data.rows["machine"]) == {"cpu: Test CPU, 2 threads"}

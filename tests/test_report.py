"""The report renders from synthetic results folders: every section, offline, never crashing."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness import schema
from harness.report import render
from harness.report.page import SECTION_ERROR, SECTIONS

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


def write_run(
    folder: Path,
    *,
    device="cpu",
    commit="a1b2c3d4e5f6",
    seed=0,
    scale=1.0,
    slow=None,
    flops_factor=None,
    samples=12,
    accuracy=True,
    meta_status="ok",
    lengths=LENGTHS,
    growth=None,
    causal=(False,),
) -> Path:
    """A results folder shaped like the sweep's: speed rows (raw samples with log-normal noise,
    times growing as GROWTH says), an unsupported variant, an OOM cell, accuracy and approx rows.

    ``scale`` multiplies every time (machine drift); ``slow`` {variant: factor} slows one
    variant; ``flops_factor`` {variant: factor} changes its analytic FLOP count."""
    rng = np.random.default_rng(seed)
    growth = GROWTH if growth is None else {v: GROWTH[v] for v in growth}
    slow, flops_factor = slow or {}, flops_factor or {}
    rows = []
    for (variant, model), n, pss, c in _grid(growth, lengths, ("fwd", "fwd_bwd"), causal):
        cell = {"kind": "speed", "variant": variant, "options": '{"seed": 0}', "seq_len": n,
                "pass": pss, "device": device, "dtype": "float32", "batch": 1, "heads": 4,
                "head_dim": 32, "causal": c}  # fmt: skip
        if variant == "full" and pss == "fwd_bwd" and n == lengths[-1] > 1024:
            rows.append(cell | {"status": "oom", "reason": f"out of memory at {n}"})
            continue
        factor = scale * slow.get(variant, 1) * (0.5 if c else 1)
        rows.append(cell | _timing(rng, model, n, pss, factor, samples))
        rows[-1]["flops"] = int(rows[-1]["flops"] * flops_factor.get(variant, 1) / (1 + c))
        rows[-1]["counted_flops"] = rows[-1]["flops"] if variant in ("full", "sdpa_math") else ""
    # fmt: off
    for n in lengths:
        rows.append({"kind": "speed", "variant": "xformers", "options": '{"seed": 0}',
                     "seq_len": n, "pass": "fwd", "device": device, "dtype": "float32",
                     "batch": 1, "heads": 4, "head_dim": 32, "causal": False,
                     "status": "unsupported", "reason": "xformers has CUDA kernels only"})
    # fmt: on
    if accuracy:
        rows += _accuracy_rows(device, rng)
    _write(folder, rows, meta_status, commit)
    return folder


def _grid(growth, lengths, passes, causal):
    return [(g, n, p, c) for g in growth.items() for c in causal for n in lengths for p in passes]


def _timing(rng, model, n, pss, factor, samples) -> dict:
    """Raw samples around t0 (n/1024)^p and memory m0 (n/1024)^pm, and what follows from them."""
    t0, p, m0, pm = model
    bwd = 3.5 if pss == "fwd_bwd" else 1.0
    raw = t0 * (n / 1024) ** p * bwd * factor * rng.lognormal(0, 0.03, samples)
    med, q1, q3 = np.median(raw), *np.percentile(raw, [25, 75])
    flops = int(4 * 4 * 32 * n * n * bwd)
    return {"status": "ok", "reason": "", "latency_ms": med, "latency_iqr_ms": q3 - q1,
            "noisy": (q3 - q1) / med > 0.1, "samples_ms": " ".join(f"{x:.5f}" for x in raw),
            "peak_mem_mb": m0 * (n / 1024) ** pm * (1.1 if bwd > 1 else 1),
            "model_mem_mb": m0 * (n / 1024) ** pm, "flops": flops,
            "gflops_per_s": flops / (med * 1e6)}  # fmt: skip


def _accuracy_rows(device, rng):
    """Two tasks x three variants x two seeds, one diverged run, and approximation errors."""
    base = {"device": device, "dtype": "float32", "options": '{"seed": 0}', "status": "ok"}
    rows = []
    # fmt: off
    for task, n, acc in (("listops", 512, 0.37), ("mqar", 256, 0.9)):
        for variant, drop in (("full", 0.0), ("local", 0.15), ("linear", 0.1)):
            for seed in (0, 1):
                rows.append(base | {"kind": "accuracy", "task": task, "variant": variant,
                                    "seq_len": n, "accuracy": acc - drop + rng.normal(0, 0.01),
                                    "steps": 100, "train_s": 5.0, "params": 1000, "seed": seed})
    rows.append(base | {"kind": "accuracy", "task": "listops", "variant": "linformer",
                        "seq_len": 512, "status": "error", "reason": "diverged (nan loss)"})
    for variant, err in (("local", 0.3), ("linear", 0.6), ("full", 0.0)):
        for inp in ("random", "trained"):
            rows.append(base | {"kind": "approx", "variant": variant, "seq_len": 512,
                                "input": inp, "approx_error": err})
    # fmt: on
    return rows


def _write(folder: Path, rows, meta_status, commit):
    prov = {"run_id": folder.name, "git_commit": commit, "torch_version": "2.13.0",
            "threads": 2, "cpu": "Test CPU", "gpu": ""}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=schema.COLUMNS)
        w.writeheader()
        for r in rows:
            r = prov | {"timestamp": "2026-01-01T00:00:00+0000"} | r
            w.writerow({k: r.get(k, "") for k in schema.COLUMNS})
    meta = prov | {"matmul_peak_gflops": {"float32": 120.0}, "config": {"sweep": "ci"}}
    if meta_status:
        meta["status"] = meta_status
    (folder / "meta.json").write_text(json.dumps(meta))


# --- checks ---------------------------------------------------------------------------------
def assert_self_contained(page: str):
    """No network: no http(s) src/href, every image a data: URI, no script."""
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*https?:""", page, re.I)
    assert "<script" not in page.lower()
    srcs = re.findall(r"""<img[^>]*\ssrc="([^"]*)\"""", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for src in srcs:  # each decodes to a PNG: no broken image in a browser
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """CPU and GPU runs of two commits in one report, with every section's data present."""
    root = tmp_path_factory.mktemp("results")
    cpu = write_run(root / "run_cpu", device="cpu", commit="aaaaaaa111", causal=(False, True))
    gpu = write_run(root / "run_gpu", device="cuda", commit="bbbbbbb222", scale=0.1, seed=1)
    page = render([cpu, gpu], tmp_path_factory.mktemp("reports"), reference="sdpa", name="both")
    return page, page.read_text()


def test_every_section_renders(full_report):
    page, text = full_report
    assert page.name == "index.html" and page.parent.name == "both"
    assert SECTION_ERROR not in text
    for sid, title, _ in SECTIONS:
        assert f'id="{sid}"' in text and title in text
    assert_self_contained(text)
    assert text.count("<img") >= 8  # latency, memory, gflops, speedup, exponents, acc x2, patterns


def test_sources_are_told_apart(full_report):
    _, text = full_report
    assert "cpu@aaaaaaa" in text and "cuda@bbbbbbb" in text


def test_csv_tables_are_written(full_report):
    page, _ = full_report
    import pandas as pd

    for name in (
        "runs",
        "speed_cells",
        "speedup",
        "exponents",
        "crossover",
        "accuracy",
        "approx",
        "accuracy_speed",
        "failures",
        "provenance",
        "patterns",
    ):
        assert (page.parent / f"{name}.csv").is_file(), name
    exp = pd.read_csv(page.parent / "exponents.csv")
    exp = exp[~exp.config.str.contains("causal")]
    t = exp[(exp.label == "local") & (exp.metric == "time") & (exp["pass"] == "fwd")]
    assert np.allclose(t["exponent"], 1.0, atol=0.1)  # the synthetic growth is recovered
    q = exp[(exp.label == "full") & (exp.metric == "memory") & (exp["pass"] == "fwd")]
    assert np.allclose(q["exponent"], 2.0, atol=0.05) and (q["stderr"] < 0.05).all()
    cx = pd.read_csv(page.parent / "crossover.csv")
    cx = cx[~cx.config.str.contains("causal")]
    lin = cx[(cx.label == "linear") & (cx["pass"] == "fwd")]
    # linear: 3 (n/1024) vs sdpa (n/1024)^2 -> equal at n = 3072
    assert np.allclose(lin["crossover_n"], 3072, rtol=0.15)
    full = cx[(cx.label == "full") & (cx["pass"] == "fwd")]
    assert full["verdict"].str.contains("not within the measured range").all()


def test_failed_cells_and_published_are_labelled(full_report):
    _, text = full_report
    assert "out of memory at 4096" in text and "xformers has CUDA kernels only" in text
    assert "diverged (nan loss)" in text
    assert "Published figures, not measured by attnbench" in text


def test_no_accuracy_rows_shows_published(tmp_path):
    run = write_run(tmp_path / "r", accuracy=False, **SMALL)
    text = render([run], tmp_path / "out", patterns=False).read_text()
    assert "No accuracy rows in these results" in text
    assert "36.37" in text  # LRA Table 1, Transformer ListOps
    assert SECTION_ERROR not in text


def _rewrite(folder: Path, keep):
    import pandas as pd

    df = pd.read_csv(folder / "results.csv", dtype=str, keep_default_na=False)
    df[df.apply(keep, axis=1)].to_csv(folder / "results.csv", index=False)


@pytest.mark.parametrize(
    "case",
    ["single_length", "all_unsupported", "no_reference", "empty_folder", "error_rows_only"],
)
def test_partial_data_does_not_crash(tmp_path, case):
    run = write_run(tmp_path / "r", accuracy=case != "single_length", **SMALL)
    if case == "single_length":
        _rewrite(run, lambda r: r["seq_len"] in ("", "1024"))
    elif case == "all_unsupported":
        _rewrite(run, lambda r: r["variant"] == "xformers")
    elif case == "no_reference":
        _rewrite(run, lambda r: r["variant"] != "sdpa")
    elif case == "empty_folder":
        (run / "results.csv").unlink()
        (run / "meta.json").unlink()
    else:
        _rewrite(run, lambda r: r["status"] != "ok")
    text = render([run], tmp_path / "out", patterns=False).read_text()
    assert SECTION_ERROR not in text
    if case in ("all_unsupported", "empty_folder", "error_rows_only"):
        assert "FAILED" in text
    if case == "no_reference":
        assert "has no ok speed rows: no speedups" in text


def test_failed_multirun_job_is_shown(tmp_path):
    """A multirun folder: one job interrupted, one left a FAILED marker, one says so in meta."""
    good = write_run(tmp_path / "multi" / "0", accuracy=False, **SMALL)
    meta = json.loads((good / "meta.json").read_text())
    (good / "meta.json").write_text(json.dumps(meta | {"interrupted": "2026-01-01T00:01:00"}))
    bad = tmp_path / "multi" / "1"
    bad.mkdir(parents=True)
    (bad / "FAILED").write_text("RuntimeError: CUDA error: device-side assert\n")
    write_run(tmp_path / "multi" / "2", meta_status="failed", accuracy=False, **SMALL)
    text = render([tmp_path / "multi"], tmp_path / "out", patterns=False).read_text()
    assert "CUDA error: device-side assert" in text
    assert "meta.json status &#x27;failed&#x27;" in text
    assert text.count('class="fail"') >= 2 and SECTION_ERROR not in text
    assert "Run 0 was interrupted" in text


def test_cli(tmp_path, capsys):
    from harness.report.__main__ import main

    run = write_run(tmp_path / "r1", accuracy=False, **SMALL)
    assert main([str(run), "--out", str(tmp_path / "rep"), "--name", "x", "--no-patterns"]) == 0
    assert capsys.readouterr().out.strip().endswith("x/index.html")


def test_patterns_match_known_masks():
    import variants
    from harness.report.patterns import N, attention_patterns

    names = [n for n in ("full", "sdpa", "local", "xformers") if n in variants.available()]
    pats = {(p.variant, p.causal): p for p in attention_patterns(names)}
    lower = np.tril(np.ones((N, N), dtype=bool))
    assert pats["full", False].visible.all()
    assert (pats["full", True].visible == lower).all() and (
        pats["sdpa", True].visible == lower
    ).all()
    if "local" in names:  # window 8: |i - j| <= 8
        i, j = np.indices((N, N))
        assert (pats["local", False].visible == (abs(i - j) <= 8)).all()
    if "xformers" in names:  # CUDA-only: not drawn, with the variant's own reason
        assert pats["xformers", False].visible is None
        assert "unsupported on CPU" in pats["xformers", False].note


def test_variant_labels_show_only_the_options_that_differ():
    from harness.report.load import variant_labels

    opts = lambda pattern: json.dumps({"block_size": 64, "pattern": pattern, "seed": 0})
    rows = pd.DataFrame(
        {
            "kind": ["speed"] * 4,
            "variant": ["sparse", "sparse", "sparse", "local"],
            "options": [opts("fixed"), opts("bigbird"), opts("fixed"), json.dumps({"window": 8})],
        }
    )
    assert list(variant_labels(rows)) == [
        "sparse[pattern=fixed]",
        "sparse[pattern=bigbird]",
        "sparse[pattern=fixed]",
        "local",
    ]


def _browser_ready() -> bool:
    import importlib.util
    import shutil

    names = ("chromium", "chromium-browser", "google-chrome")
    has_browser = any(shutil.which(n) for n in names)
    return has_browser and importlib.util.find_spec("playwright") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _browser_ready(), reason="needs Chromium and playwright")
def test_page_in_headless_chromium_shows_every_plot(full_report):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import check_report

    page, _ = full_report
    images, problems = check_report.check_page(page, check_report.find_chromium(None))
    assert images > 5 and problems == []

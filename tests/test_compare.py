"""The regression check: drift-proof ratios, a rank test that must agree, exact metrics exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_report import write_run  # the synthetic results folder the report tests use

from harness.compare import main


def run_compare(capsys, base, new, *extra):
    code = main([str(base), str(new), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def base(tmp_path):
    return write_run(tmp_path / "base", seed=1)


def test_aa_is_clean(tmp_path, base, capsys):
    new = write_run(tmp_path / "new", seed=2)  # same code, fresh noise
    code, out, _ = run_compare(capsys, base, new)
    assert code == 0, out
    assert "0 regression(s)" in out and "REGRESSION" not in out.replace("0 regression", "")


def test_injected_slowdown_is_flagged(tmp_path, base, capsys):
    new = write_run(tmp_path / "new", seed=2, slow={"local": 1.5})
    code, out, _ = run_compare(capsys, base, new)
    assert code == 1
    flagged = out.split("REGRESSIONS:")[1]
    assert "local" in flagged and "linear" not in flagged and "full" not in flagged
    assert "+50" in out or "+4" in out or "+5" in out  # the change column shows ~+50%


def test_machine_wide_drift_is_not_a_regression(tmp_path, base, capsys):
    new = write_run(tmp_path / "new", seed=3, scale=1.3)  # every cell, reference included
    code, out, _ = run_compare(capsys, base, new)
    assert code == 0, out


def test_a_variant_is_judged_by_all_its_cells(tmp_path, base, capsys):
    """Two samples per cell cannot pass a rank test at alpha 0.01, but every cell of the slowed
    variant moving the same way passes the signed-rank test over its cells."""
    b = write_run(tmp_path / "b2", seed=1, samples=2)
    n = write_run(tmp_path / "n2", seed=2, samples=2, slow={"local": 1.5})
    code, out, _ = run_compare(capsys, b, n)
    assert code == 1 and "REGRESSION (variant)" in out
    flagged = out.split("REGRESSIONS:")[1]
    assert "local" in flagged and "linear" not in flagged and "full" not in flagged


def test_one_drifting_cell_is_not_a_regression(tmp_path, base, capsys):
    """One cell of a shared machine can drift by half: alone, it must pass --cell-threshold."""
    new = write_run(tmp_path / "new", seed=2)
    rows = (new / "results.csv").read_text().splitlines()
    header, body = rows[0].split(","), rows[1:]
    i = next(k for k, line in enumerate(body) if line.startswith("speed,local,"))
    lat = header.index("samples_ms")
    cols = next(iter(__import__("csv").reader([body[i]])))
    cols[lat] = " ".join(f"{float(x) * 1.6:.6g}" for x in cols[lat].split())
    cols[header.index("latency_ms")] = f"{float(cols[header.index('latency_ms')]) * 1.6:.6g}"
    buf = __import__("io").StringIO()
    __import__("csv").writer(buf, lineterminator="").writerow(cols)
    body[i] = buf.getvalue()
    (new / "results.csv").write_text("\n".join([rows[0], *body]) + "\n")
    code, out, _ = run_compare(capsys, base, new)
    assert code == 0 and "slower, one cell (variant ok)" in out
    code, out, _ = run_compare(capsys, base, new, "--cell-threshold", "0.5")
    assert code == 1


def test_flop_change_is_an_exact_mismatch(tmp_path, base, capsys):
    new = write_run(tmp_path / "new", seed=2, flops_factor={"linear": 0.5})
    code, out, _ = run_compare(capsys, base, new)
    assert code == 1
    assert "flops changed" in out and "linear" in out.split("Exact metrics")[1]


# ids without "cuda": conftest skips tests carrying that keyword on machines without a GPU
@pytest.mark.parametrize("device", ["cuda", "cpu"], ids=["gpu_rows", "cpu_rows"])
def test_peak_memory_is_exact_on_cuda_only(tmp_path, device, capsys):
    """CUDA allocator bytes are deterministic; a CPU high-water mark is not (compared never)."""
    base = write_run(tmp_path / "base", seed=1, device=device, accuracy=False)
    new = write_run(tmp_path / "new", seed=2, device=device, accuracy=False)
    text = (new / "results.csv").read_text().replace(",4.0,4.0,", ",4.5,4.0,", 1)
    (new / "results.csv").write_text(text)  # sdpa fwd at n=1024: 4.0 MB -> 4.5 MB
    code, out, _ = run_compare(capsys, base, new)
    if device == "cuda":
        assert code == 1 and "peak_mem_mb changed 4 -> 4.5" in out
    else:
        assert code == 0, out


def test_cell_that_now_fails_is_flagged(tmp_path, base, capsys):
    new = write_run(tmp_path / "new", seed=2)
    text = (new / "results.csv").read_text().splitlines()
    i = next(i for i, line in enumerate(text) if line.startswith("speed,local,") and ",ok," in line)
    text[i] = text[i].replace(",ok,", ",oom,", 1)
    (new / "results.csv").write_text("\n".join(text) + "\n")
    code, out, _ = run_compare(capsys, base, new)
    assert code == 1 and "BROKE: now oom" in out


@pytest.mark.parametrize("case", ["missing", "no_reference", "no_common", "not_json"])
def test_uncomparable_inputs_exit_2(tmp_path, base, capsys, case):
    new = tmp_path / "new"
    if case == "missing":
        pass
    elif case == "no_reference":
        write_run(new, seed=2)
        code, _, err = run_compare(capsys, base, new, "--reference", "nonexistent")
        assert code == 2 and "nonexistent" in err
        return
    elif case == "no_common":
        write_run(new, seed=2, lengths=(8192,), growth=("sdpa_math", "full"), accuracy=False)
    else:
        new = tmp_path / "new.json"
        new.write_text("[1, 2]")
    code, _, err = run_compare(capsys, base, new)
    assert code == 2 and err.startswith("cannot compare:")


# --- pytest-benchmark JSON ------------------------------------------------------------------
def bench_json(path, seed=0, scale=1.0, slow=None, rounds=15):
    """The shape of ``pytest --benchmark-json`` output (times in seconds)."""
    rng = np.random.default_rng(seed)
    slow = slow or {}
    benches = []
    for name, ms in (("control_matmul", 2.0), ("full", 3.0), ("local", 1.0)):
        data = list(ms / 1000 * scale * slow.get(name, 1) * rng.lognormal(0, 0.03, rounds))
        info = (
            {"control": True}
            if name.startswith("control")
            else {"variant": name, "shape": "B1 H4 n256 d32 float32", "flops": 33554432}
        )
        benches.append(
            {
                "group": "attention-micro",
                "name": f"test_micro[{name}]",
                "extra_info": info,
                "stats": {"data": data, "median": float(np.median(data)), "rounds": rounds},
            }
        )
    path.write_text(json.dumps({"benchmarks": benches, "version": "5.1.0"}))
    return path


def test_benchmark_json(tmp_path, capsys):
    base = bench_json(tmp_path / "base.json", seed=0)
    assert run_compare(capsys, base, bench_json(tmp_path / "aa.json", seed=1))[0] == 0
    assert run_compare(capsys, base, bench_json(tmp_path / "drift.json", seed=2, scale=1.4))[0] == 0
    code, out, _ = run_compare(
        capsys, base, bench_json(tmp_path / "s.json", seed=3, slow={"full": 1.5})
    )
    assert code == 1 and "test_micro[full]" in out.split("REGRESSIONS:")[1]


def test_benchmark_json_without_control_exits_2(tmp_path, capsys):
    path = bench_json(tmp_path / "b.json")
    data = json.loads(path.read_text())
    data["benchmarks"] = [b for b in data["benchmarks"] if "control" not in b["name"]]
    path.write_text(json.dumps(data))
    code, _, err = run_compare(capsys, path, path)
    assert code == 2 and "control" in err

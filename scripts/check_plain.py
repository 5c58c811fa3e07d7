"""Does the harness time what a plain process times? A few cells measured both ways, side by side.

    python scripts/check_plain.py [--out results/plain-check] [--cells linear:16384 local:8192 ...]

Each cell (fwd, float32, batch 1, 8 heads, head_dim 64) is measured by ``python -m harness``
(a worker process, the default `cached` allocator) and by a plain Python process that does
nothing but build the variant, make q, k, v and call ``torch.utils.benchmark.Timer`` on it,
under the same allocator setting (the environment harness/allocator.py gives the worker) and
the same thread count. The two kinds of measurement alternate (harness, plain, harness, plain)
so that a slow spell of a shared machine hits both. Prints the ratio harness / plain per cell
and writes it to ``<out>/plain_check.csv`` and ``.md``; a ratio outside 0.8 .. 1.25 exits 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import allocator, results  # noqa: E402

CELLS = ["linear:16384", "local:8192", "flex_local:8192"]
BAND = (0.8, 1.25)
PLAIN = """
import json, sys, torch
from torch.utils.benchmark import Timer
import variants
name, n, threads, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
torch.set_num_threads(threads)
attn = variants.build(name, seq_len=n, num_heads=8, head_dim=64)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 8, n, 64, generator=g) for _ in range(3))
def call():
    with torch.no_grad():
        attn(q, k, v)
call()  # warm-up (a compiled baseline compiles here)
timer = Timer("call()", globals={"call": call}, num_threads=threads)
m = timer.blocked_autorange(min_run_time=seconds)
print(json.dumps({"median_ms": m.median * 1e3, "blocks": len(m.times)}))
"""


def plain(name: str, n: int, threads: int, seconds: float) -> float:
    env = {**os.environ, **allocator.worker_env("cached"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PLAIN, name, str(n), str(threads), str(seconds)],
        capture_output=True, text=True, env=env, check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]


def harnessed(name: str, n: int, seconds: float, folder: Path, tag: str) -> float:
    overrides = [
        f"sweep.variants=[{name}]", "sweep.extra=[]", f"sweep.seq_lens=[{n}]",
        "sweep.num_heads=[8]", "sweep.head_dims=[64]", "sweep.passes=[fwd]",
        f"sweep.min_run_time={seconds}", "sweep.min_blocks=3", "sweep.timeout_s=900",
        f"results_dir={folder}", f"run_id={tag}", "report=false",
    ]  # fmt: skip
    subprocess.run([sys.executable, "-m", "harness", *overrides], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    (row,) = [r for r in results.read_run(folder / tag).rows.to_dict("records")]
    if row["status"] != "ok":
        raise RuntimeError(f"{name} n={n}: {row['status']}: {row['reason']}")
    return float(row["latency_ms"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=CELLS, help="variant:seq_len ...")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "plain-check")
    parser.add_argument("--repeats", type=int, default=2, help="alternations per cell")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per measurement")
    args = parser.parse_args(argv)
    import torch

    threads = torch.get_num_threads()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.cells:
            name, n = spec.split(":")[0], int(spec.split(":")[1])
            h, p = [], []
            for i in range(args.repeats):
                h.append(harnessed(name, n, args.seconds, Path(tmp), f"{name}-{n}-{i}"))
                p.append(plain(name, n, threads, args.seconds))
            ratio = statistics.median(h) / statistics.median(p)
            lines.append({"variant": name, "seq_len": n, "harness_ms": statistics.median(h),
                          "plain_ms": statistics.median(p), "ratio": ratio,
                          "ok": BAND[0] <= ratio <= BAND[1]})  # fmt: skip
            x = lines[-1]
            print(f"{name:12s} n={n:6d} harness {x['harness_ms']:9.2f} ms  "
                  f"plain {x['plain_ms']:9.2f} ms  ratio {ratio:.3f}", flush=True)  # fmt: skip
    write(args.out, lines, threads)
    return 0 if all(x["ok"] for x in lines) else 1


def write(out: Path, lines: list[dict], threads: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "plain_check.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(lines[0]))
        w.writeheader()
        w.writerows(lines)
    md = [
        f"# Harness vs plain process ({results.cpu_model()}, {threads} threads, "
        f"commit {results.git_commit()}, {results.now()})",
        "",
        "fwd, float32, B1 H8 d64; the median of each side's medians; band "
        f"{BAND[0]}..{BAND[1]}. Reproduce: `python scripts/check_plain.py`.",
        "",
        "| variant | n | harness ms | plain ms | ratio |",
        "|---|---|---|---|---|",
    ]
    md += [
        f"| {x['variant']} | {x['seq_len']} | {x['harness_ms']:.2f} | {x['plain_ms']:.2f} | "
        f"{x['ratio']:.3f} |"
        for x in lines
    ]
    (out / "plain_check.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    sys.exit(main())

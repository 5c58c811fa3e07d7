"""The sweep: the grid is data, one function decides and measures one cell, rows land as they
finish. ``run(cfg)`` is the whole command; ``python -m harness`` only calls it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import itertools
import json
import time
from collections import Counter
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

import variants

from . import results as res
from .cell import failure, one_line
from .measure import DTYPES, gflops_per_s, summarize
from .validate import ConfigError, Plan, check
from .worker import Worker

__all__ = ["ConfigError", "run", "grid"]


# --- the grid ---------------------------------------------------------------------------------
def grid(plan: Plan, sweep) -> list[dict]:
    """Every cell of the sweep, in a fixed order (variant, dtype, shape, causal, n, pass)."""
    cells: dict[tuple, dict] = {}
    for entry in plan.entries:
        axes = (
            sweep.dtypes,
            sweep.batch_sizes,
            entry.axes["num_heads"],
            sweep.head_dims,
            entry.axes["causal"],
            entry.axes["seq_lens"],
            entry.axes["passes"],
        )
        for dtype, batch, heads, head_dim, causal, seq_len, pass_ in itertools.product(*axes):
            cell = {
                "variant": entry.name,
                "options": entry.options,
                "device": plan.device,
                "dtype": dtype,
                "batch": batch,
                "heads": heads,
                "seq_len": seq_len,
                "head_dim": head_dim,
                "causal": bool(causal),
                "pass": pass_,
            }
            cells.setdefault(res.cell_key(cell_row(cell)), cell)  # an extra may repeat a cell
    ordered = list(cells.values())
    if sweep.get("order", "variant") == "shape":  # stable: variants keep their order per shape
        ordered.sort(key=lambda c: tuple(str(c[k]) for k in SHAPE_ORDER))
    return ordered


SHAPE_ORDER = ("dtype", "batch", "heads", "head_dim", "causal", "seq_len", "pass")


def cell_row(cell: dict) -> dict:
    return {"kind": "speed", **cell, "options": json.dumps(cell["options"], sort_keys=True)}


# --- one cell ---------------------------------------------------------------------------------
def measure(cell: dict, plan: Plan, sweep, worker: Worker) -> dict:
    """The row of one cell: decided here when it cannot or must not run, else measured in the
    worker. Never raises for a variant's failure."""
    row = cell_row(cell)
    try:
        attn = variants.build(
            cell["variant"],
            **cell["options"],
            seq_len=cell["seq_len"],
            num_heads=cell["heads"],
            head_dim=cell["head_dim"],
        )
        row.update(analytic(attn, cell))
        reasons = refusals(attn, cell)
        if reasons:
            return {**row, "status": "unsupported", "reason": one_line("; ".join(reasons))}
        planned = planned_bytes(attn, cell)
        if plan.budget_bytes and planned and planned > plan.budget_bytes:
            return {**row, "status": "oom", "reason": over_budget(planned, plan.budget_bytes)}
        job = {**cell, **timing(sweep, plan), "origin": origin(attn, cell["variant"])}
        job["slowdown"] = plan.slowdown.get(cell["variant"], 1.0)
    except Exception as e:  # the variant failed to build or to describe itself
        return {**row, **failure(e)}
    result = worker.run(job, sweep.timeout_s)
    row.update(result)
    row["gflops_per_s"] = gflops_per_s(row.get("flops"), row.get("latency_ms"))
    return row


def analytic(attn, cell: dict) -> dict:
    """The variant's own account of the cell: FLOPs of the pass and modelled forward memory."""
    shape = {k: cell[k] for k in ("batch", "heads", "seq_len", "head_dim", "causal")}
    out = {"flops": attn.flops(**shape, backward=cell["pass"] == "fwd_bwd")}
    model = attn.memory_model(**shape, dtype=DTYPES[cell["dtype"]])
    out["model_mem_mb"] = None if model is None else model / 2**20
    return out


def refusals(attn, cell: dict) -> list[str]:
    """Declared reasons the variant cannot run the cell (checked before any worker is used)."""
    reasons = attn.unsupported(
        device=cell["device"],
        dtype=DTYPES[cell["dtype"]],
        causal=cell["causal"],
        seq_len=cell["seq_len"],
    )
    if cell["pass"] == "fwd_bwd" and hasattr(attn, "backward_unsupported"):
        reasons = reasons + attn.backward_unsupported(device=cell["device"])
    return list(reasons)


def planned_bytes(attn, cell: dict) -> int | None:
    """The memory model plus the tensors the harness itself holds: q, k, v and the output; for
    fwd_bwd also their gradients and twice the forward's transient memory (autograd keeps the
    forward's intermediates for backward while backward makes its own)."""
    shape = {k: cell[k] for k in ("batch", "heads", "seq_len", "head_dim", "causal")}
    model = attn.memory_model(**shape, dtype=DTYPES[cell["dtype"]])
    if model is None:
        return None
    io = cell["batch"] * cell["heads"] * cell["seq_len"] * cell["head_dim"]
    io *= torch.empty((), dtype=DTYPES[cell["dtype"]]).element_size()
    if cell["pass"] == "fwd_bwd":
        return 8 * io + 2 * model
    return 4 * io + model


def over_budget(planned: int, budget: int) -> str:
    return (
        f"memory model plans {planned / 2**20:.0f} MB, over the budget of {budget / 2**20:.0f} MB "
        "(sweep.memory_budget_mb); not run"
    )


def timing(sweep, plan: Plan) -> dict:
    return {
        "threads": plan.threads,
        "min_run_time": sweep.min_run_time,
        "min_blocks": sweep.min_blocks,
        "seed": sweep.seed,
    }


def origin(attn, name: str):
    """The classes a fresh worker needs to register a variant that lives outside `variants/`."""
    if type(attn).__module__.split(".")[0] == "variants":
        return None
    return (type(attn), variants.config_class(name))


# --- the run ----------------------------------------------------------------------------------
def run(cfg) -> Path:
    """Run the configured sweep (or accuracy task); returns the run's results folder."""
    cfg = resumed_config(cfg) if cfg.resume else cfg
    plan = check(cfg)  # raises ConfigError before anything is created
    if plan.slowdown:
        print(f"inject_slowdown {plan.slowdown}: these timings are slowed on purpose", flush=True)
    run_id = str(cfg.resume or cfg.run_id)
    run_dir = Path(cfg.results_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    table = res.ResultsFile(run_dir / "results.csv")
    prov = res.provenance(run_id, plan.device, plan.threads)
    meta = start_meta(cfg, plan, run_dir, prov)
    started = time.perf_counter()
    worker = Worker(plan.threads, plan.device, plan.allocator)
    counts: Counter = Counter()
    try:
        if cfg.task:
            counts = run_task(cfg, plan, table, prov)
        else:
            measure_peak(meta, plan, worker, run_dir)
            counts = run_cells(grid(plan, cfg.sweep), plan, cfg.sweep, table, worker, prov)
    except KeyboardInterrupt:  # the worker (own process group) did not see Ctrl-C: stop it now
        worker.kill()
        meta["interrupted"] = res.now()
        raise
    finally:
        worker.stop()
        finish_meta(meta, run_dir, table, counts, time.perf_counter() - started)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing new to measure"
    print(f"results: {run_dir / 'results.csv'} ({summary})")
    if cfg.report:
        render_report(run_dir)
    return run_dir


def run_cells(cells, plan, sweep, table, worker, prov) -> Counter:
    """Measure every cell not yet in the table. With ``sweep.rounds`` > 1 the whole grid is
    measured that many times over and each cell's samples are pooled, so a slow spell of a
    shared machine lands in one round of a cell, not in all of its samples; rows are then
    written in the last round."""
    done = table.done_cells()
    todo = [c for c in cells if res.cell_key(cell_row(c)) not in done]
    if len(todo) < len(cells):
        print(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already measured")
    rounds = int(sweep.get("rounds", 1))
    rows: list[dict | None] = [None] * len(todo)
    counts: Counter = Counter()
    with tqdm(total=len(todo) * rounds, unit="cell", dynamic_ncols=True) as bar:
        for r in range(rounds):
            for i, cell in enumerate(todo):
                if rows[i] is None or rows[i]["status"] == "ok":  # a failed cell is not retried
                    bar.set_postfix_str(describe(cell), refresh=True)
                    rows[i] = pool_rounds(rows[i], measure(cell, plan, sweep, worker))
                bar.update()
                if r < rounds - 1:
                    continue
                row = rows[i]
                table.append({**row, **prov, "timestamp": res.now()})
                counts[row["status"]] += 1
                if row["status"] not in ("ok", "unsupported"):
                    bar.write(f"{row['status']}: {describe(cell)}: {row.get('reason', '')}")
    return counts


def pool_rounds(before: dict | None, now: dict) -> dict:
    """One row from a cell's rounds: the samples pooled and summarised again (a failure in a
    later round is the row)."""
    if before is None or now["status"] != "ok":
        return now
    ms = [float(x) for x in f"{before['samples_ms']} {now['samples_ms']}".split()]
    row = {**before, **summarize([x / 1e3 for x in ms])}
    row["peak_mem_mb"] = max(before.get("peak_mem_mb") or 0, now.get("peak_mem_mb") or 0)
    row["gflops_per_s"] = gflops_per_s(row.get("flops"), row.get("latency_ms"))
    return row


def describe(cell: dict) -> str:
    return (
        f"{cell['variant']} {cell['dtype']} b{cell['batch']} h{cell['heads']} "
        f"n{cell['seq_len']} d{cell['head_dim']}{' causal' if cell['causal'] else ''} "
        f"{cell['pass']}"
    )


# --- resume, provenance, peak -----------------------------------------------------------------
def resumed_config(cfg):
    """A resumed run repeats its own sweep: the saved config, not the command line's."""
    run_dir = Path(cfg.results_dir) / str(cfg.resume)
    try:
        saved = res.read_meta(run_dir)["config"]
    except (OSError, KeyError, ValueError):
        return cfg  # check() explains what is missing
    keys = ("sweep", "device", "variant", "task", "preset")
    current = OmegaConf.to_container(cfg, resolve=True)
    if any(current.get(k) != saved.get(k) for k in keys):
        print(f"resume={cfg.resume}: repeating that run's own sweep (its meta.json config)")
    merged = OmegaConf.create(saved)
    merged.merge_with(
        {"resume": str(cfg.resume), "run_id": str(cfg.resume), "report": bool(cfg.report)}
    )
    merged.results_dir = cfg.results_dir
    return merged


def saved_config(cfg) -> dict:
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in ("hydra", "defaults"):
        config.pop(key, None)
    return config


def start_meta(cfg, plan: Plan, run_dir: Path, prov: dict) -> dict:
    """meta.json: written before the first cell; a resume keeps the original and adds to it."""
    if (run_dir / "meta.json").exists():
        meta = res.read_meta(run_dir)
        meta.setdefault("resumes", []).append({"started": res.now(), **prov})
        return meta
    meta = {
        **prov,
        "started": res.now(),
        "python": __import__("platform").python_version(),
        "platform": __import__("platform").platform(),
        "device": plan.device,
        "cuda": torch.version.cuda,
        "memory_budget_mb": plan.budget_bytes and plan.budget_bytes / 2**20,
        "variants": [{"name": e.name, "options": e.options} for e in plan.entries],
        "config": saved_config(cfg),
    }
    res.write_meta(run_dir, meta)
    return meta


def finish_meta(meta: dict, run_dir: Path, table, counts: Counter, wall_s: float) -> None:
    """What this invocation measured, and the status of every row now in the table."""
    this = {"finished": res.now(), "wall_s": round(wall_s, 1), "measured": dict(counts)}
    (meta["resumes"][-1] if meta.get("resumes") else meta).update(this)
    meta["status_counts"] = dict(Counter(r["status"] for r in table.rows()))
    res.write_meta(run_dir, meta)


def measure_peak(meta: dict, plan: Plan, worker: Worker, run_dir: Path) -> None:
    """The machine's matmul GFLOP/s once per run (kept across a resume), in the worker."""
    if meta.get("matmul_peak_gflops"):
        return
    job = {"kind": "matmul_peak", "device": plan.device, "dtypes": plan.dtypes}
    job.update(threads=plan.threads, size=plan.matmul_size)
    answer = worker.run(job, timeout_s=600)
    meta["matmul_peak_gflops"] = answer.get("gflops") or {"error": answer.get("reason")}
    meta["cpu_peak_memory"] = "VmHWM (reset per cell)" if worker.resettable else "ru_maxrss"
    meta["allocator"] = worker.allocator
    res.write_meta(run_dir, meta)


# --- hooks for the other products -------------------------------------------------------------
def set_options(name: str, options: dict) -> dict:
    """The options a config sets away from the variant's defaults. A task's preset scales the
    length-tied ones (window, block, projection, bucket) to its sequence; a default from
    conf/variant must not undo that (window 128 on a 64-token task is full attention)."""
    defaults = dataclasses.asdict(variants.config_class(name)())
    return {k: v for k, v in options.items() if k not in defaults or defaults[k] != v}


def run_task(cfg, plan: Plan, table, prov) -> Counter:
    """Accuracy rows from harness.tasks (issue 5), into the same results table."""
    tasks = importlib.import_module("harness.tasks")
    names = list(dict.fromkeys(e.name for e in plan.entries))
    options = {}
    for entry in plan.entries:
        options.setdefault(entry.name, set_options(entry.name, entry.options))
    rows = tasks.run_task(
        task=cfg.task,
        preset=cfg.preset,
        variant_names=names,
        variant_options=options,
        device=plan.device,
        done=table.done_tasks(),
    )
    counts: Counter = Counter()
    for row in rows:
        table.append({"kind": "accuracy", **row, **prov, "timestamp": res.now()})
        counts[row.get("status", "ok")] += 1
    return counts


def render_report(run_dir: Path) -> Path | None:
    """harness.report's page for this run, once that module exists (issue 6)."""
    if importlib.util.find_spec("harness.report") is None:
        return None
    from harness import report

    render = getattr(report, "render", None)
    if render is None:
        return None
    try:
        page = render([run_dir])
    except Exception as e:  # the results are safe on disk; say why there is no page
        print(f"report: not rendered ({one_line(f'{type(e).__name__}: {e}', 300)})")
        return None
    print(f"report: {page}")
    return Path(page)

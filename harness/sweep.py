"""The sweep: the grid is data, one function decides and measures one cell, rows land as they
finish. ``run(cfg)`` is the whole command; ``python -m harness`` only calls it (and then the
report, from above both).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import platform
import signal
import time
from collections import Counter
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

import variants

from . import results as res
from .cell import failure, one_line, origin_of
from .measure import DTYPES, gflops_per_s
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
            entry.axes["kv_heads"],
            sweep.head_dims,
            entry.axes["causal"],
            entry.axes["seq_lens"],
            entry.axes["passes"],
        )
        for dtype, batch, heads, kv, head_dim, causal, seq_len, pass_ in itertools.product(*axes):
            cell = {
                "variant": entry.name,
                "options": entry.options,
                "device": plan.device,
                "dtype": dtype,
                "batch": batch,
                "heads": heads,
                "kv_heads": kv or heads,
                "seq_len": seq_len,
                "head_dim": head_dim,
                "causal": bool(causal) or pass_ == "decode",  # decoding is causal by nature
                "pass": pass_,
            }
            cells.setdefault(res.row_key(cell_row(cell)), cell)  # an extra may repeat a cell
    ordered = list(cells.values())
    if sweep.get("order", "variant") == "shape":  # stable: variants keep their order per shape
        ordered.sort(key=lambda c: tuple(str(c[k]) for k in SHAPE_ORDER))
    return ordered


SHAPE_ORDER = ("dtype", "batch", "heads", "kv_heads", "head_dim", "causal", "seq_len", "pass")


def train_step_grid(plan: Plan, sweep) -> list[dict]:
    """Every training-step cell: variants x dtypes x batch sizes x lengths; the heads and width
    are the model's."""
    model = OmegaConf.to_container(sweep.model) if OmegaConf.is_config(sweep.model) else sweep.model
    cells: dict[tuple, dict] = {}
    for entry in plan.entries:
        axes = (sweep.dtypes, sweep.batch_sizes, entry.axes["seq_lens"])
        for dtype, batch, seq_len in itertools.product(*axes):
            cell = {
                "kind": "train_step",
                "task": sweep.task_name,
                "variant": entry.name,
                "options": entry.options,
                "device": plan.device,
                "dtype": dtype,
                "batch": batch,
                "seq_len": seq_len,
                "model": dict(model),
            }
            cells.setdefault(res.row_key(cell_row(cell)), cell)
    return list(cells.values())


def cell_row(cell: dict) -> dict:
    row = {"kind": "speed", **cell, "options": json.dumps(cell["options"], sort_keys=True)}
    if "model" in cell:
        row["model"] = json.dumps(cell["model"], sort_keys=True)
    return row


# --- one cell ---------------------------------------------------------------------------------
def build(cell: dict):
    return variants.build(
        cell["variant"],
        **cell["options"],
        seq_len=cell["seq_len"],
        num_heads=cell["heads"],
        kv_heads=cell["kv_heads"],
        head_dim=cell["head_dim"],
    )


def measure(cell: dict, plan: Plan, sweep, worker: Worker) -> dict:
    """The row of one cell: decided here when it cannot or must not run, else measured in the
    worker. Never raises for a variant's failure."""
    if cell.get("kind") == "train_step":
        return measure_train_step(cell, plan, sweep, worker)
    row = cell_row(cell)
    try:
        attn = build(cell)
        row.update(analytic(attn, cell))
        reasons = refusals(attn, cell)
        if reasons:
            return {**row, "status": "unsupported", "reason": one_line("; ".join(reasons))}
        planned = planned_bytes(attn, cell)
        if plan.budget_bytes and planned and planned > plan.budget_bytes:
            return {**row, "status": "oom", "reason": over_budget(planned, plan.budget_bytes)}
        job = {**cell, **timing(sweep, plan), "origin": origin_of(attn, cell["variant"])}
        job["slowdown"] = plan.slowdown_of(cell)
    except Exception as e:  # the variant failed to build or to describe itself
        return {**row, **failure(e)}
    result = worker.run(job, sweep.timeout_s)
    row.update(result)
    row["gflops_per_s"] = gflops_per_s(row.get("flops"), row.get("latency_ms"))
    return row


def measure_train_step(cell: dict, plan: Plan, sweep, worker: Worker) -> dict:
    """A training step is measured in the worker, which knows the model; its failures are rows."""
    job = {**cell, **timing(sweep, plan), "slowdown": plan.slowdown_of(cell)}
    return {**cell_row(cell), **worker.run(job, sweep.timeout_s)}


def shape_of(cell: dict) -> dict:
    return {k: cell[k] for k in ("batch", "heads", "seq_len", "head_dim", "kv_heads")}


def analytic(attn, cell: dict) -> dict:
    """The variant's own account of the cell: FLOPs of the pass, modelled memory of the pass
    and, for decode, of the state."""
    shape, dtype = shape_of(cell), DTYPES[cell["dtype"]]
    if cell["pass"] == "decode":
        return {"flops": attn.decode_flops(**shape)}
    backward = cell["pass"] == "fwd_bwd"
    flops = attn.flops(**shape, causal=cell["causal"], backward=backward)
    model = attn.memory_model(**shape, causal=cell["causal"], dtype=dtype, backward=backward)
    return {"flops": flops, "model_mem_mb": None if model is None else model / 2**20}


def refusals(attn, cell: dict) -> list[str]:
    """Declared reasons the variant cannot run the cell (checked before any worker is used)."""
    dtype = DTYPES[cell["dtype"]]
    reasons = attn.unsupported(
        device=cell["device"],
        dtype=dtype,
        causal=cell["causal"],
        seq_len=cell["seq_len"],
        kv_heads=cell["kv_heads"],
    )
    if cell["pass"] == "fwd_bwd":
        reasons = reasons + attn.backward_unsupported(device=cell["device"])
    if cell["pass"] == "decode":
        reasons = reasons + attn.decode_unsupported(device=cell["device"], dtype=dtype)
    return list(dict.fromkeys(reasons))


def planned_bytes(attn, cell: dict) -> int | None:
    """What the cell will hold at its peak: the tensors the harness makes (q, k, v, and for
    fwd_bwd the output gradient; decode: the prompt and its state) plus the pass's model."""
    dtype = DTYPES[cell["dtype"]]
    size = torch.empty((), dtype=dtype).element_size()
    q = cell["batch"] * cell["heads"] * cell["seq_len"] * cell["head_dim"] * size
    kv = q * cell["kv_heads"] // cell["heads"]
    if cell["pass"] == "decode":
        kw = {k: cell[k] for k in ("batch", "seq_len", "head_dim", "kv_heads")}
        cache = attn.cache_model(**kw, dtype=dtype)
        return None if cache is None else q + 2 * kv + cache
    model = attn.memory_model(
        **shape_of(cell), causal=cell["causal"], dtype=dtype, backward=cell["pass"] == "fwd_bwd"
    )
    if model is None:
        return None
    return q + 2 * kv + (q if cell["pass"] == "fwd_bwd" else 0) + model


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


# --- the run ----------------------------------------------------------------------------------
def run(cfg, overrides: list[str] | None = None) -> Path:
    """Run the configured sweep (or accuracy task); returns the run's results folder.

    ``overrides``: the command line's (None: not run from a command line, e.g. a test that
    composed ``cfg`` itself), recorded in meta.json (the command that reproduces the run) and,
    on ``resume``, applied over the saved run's own."""
    if cfg.resume:
        cfg = resumed_config(cfg, overrides)
    plan = check(cfg)  # raises ConfigError before anything is created
    if plan.slowdown:
        print(f"inject_slowdown {plan.slowdown}: these timings are slowed on purpose", flush=True)
    run_id = str(cfg.resume or cfg.run_id)
    run_dir = Path(cfg.results_dir) / run_id
    with res.RunLock(run_dir), _sigterm_as_interrupt():
        return _run_locked(cfg, plan, run_dir, run_id, overrides)


def _run_locked(cfg, plan: Plan, run_dir: Path, run_id: str, overrides) -> Path:
    prov = res.provenance(run_id, plan.device, plan.threads)
    # meta.json before the first line of results.csv: a run killed at any moment is resumable
    meta = start_meta(cfg, plan, run_dir, prov, overrides)
    table = res.ResultsFile(run_dir / res.RESULTS)
    started = time.perf_counter()
    worker = Worker(plan.threads, plan.device, plan.allocator)
    counts: Counter = Counter()
    record = meta["resumes"][-1] if meta.get("resumes") else meta
    try:
        if cfg.task:
            from .tasks.run import run_task  # the accuracy side: its jobs run in the worker

            counts = run_task(cfg, plan, table, prov, worker)
        else:
            measure_peak(meta, plan, worker, run_dir)
            make = train_step_grid if cfg.sweep.kind == "train_step" else grid
            counts = run_cells(make(plan, cfg.sweep), plan, cfg.sweep, table, worker, prov)
            if cfg.sweep.kind == "speed" and cfg.sweep.patterns:
                record_patterns(plan, run_dir, worker)
    except KeyboardInterrupt:  # the worker (own process group) did not see Ctrl-C: stop it now
        worker.kill()
        record["interrupted"] = res.now()
        raise
    finally:
        worker.stop()
        finish_meta(meta, record, run_dir, table, counts, time.perf_counter() - started)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing new to measure"
    print(f"results: {run_dir / res.RESULTS} ({summary})")
    return run_dir


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's kill, ``timeout``) stops the sweep as Ctrl-C does: the worker is
    stopped and meta.json says the run was interrupted."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a launcher's job): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cells(cells, plan, sweep, table, worker, prov) -> Counter:
    """Measure every (cell, round) not yet in the table. With ``sweep.rounds`` > 1 the whole
    grid is measured that many times over, one row per cell and round (readers pool them), so
    a slow spell of a shared machine lands in one round of a cell, not in all of its samples,
    and an interrupt loses at most the round in progress. A cell that fails is not measured
    again in later rounds."""
    rounds = int(sweep.get("rounds", 1))
    kind = sweep.get("kind", "speed")
    written = table.done_rounds(kind)
    failed = table.done(kind, rounds=10**9)  # keys with a failed row (done at any count)
    keys = [res.row_key(cell_row(c)) for c in cells]
    todo = [
        (r, cell, key)
        for r in range(rounds)
        for cell, key in zip(cells, keys, strict=True)
        if r not in written.get(key, set()) and key not in failed
    ]
    if len(todo) < len(cells) * rounds:
        print(f"resuming: {len(cells) * rounds - len(todo)} of {len(cells) * rounds} measured")
    counts: Counter = Counter()
    dead: set = set()
    with tqdm(total=len(todo), unit="cell", dynamic_ncols=True) as bar:
        for r, cell, key in todo:
            bar.update()
            if key in dead:
                continue
            bar.set_postfix_str(describe(cell), refresh=True)
            row = measure(cell, plan, sweep, worker)
            table.append({**row, "round": r, **prov, "timestamp": res.now()})
            if r == rounds - 1 or row["status"] != "ok":
                counts[row["status"]] += 1
            if row["status"] != "ok":
                dead.add(key)
                if row["status"] != "unsupported":
                    bar.write(f"{row['status']}: {describe(cell)}: {row.get('reason', '')}")
    return counts


def describe(cell: dict) -> str:
    if cell.get("kind") == "train_step":
        return f"{cell['variant']} train step {cell['dtype']} b{cell['batch']} n{cell['seq_len']}"
    kv = f"/{cell['kv_heads']}" if cell["kv_heads"] != cell["heads"] else ""
    return (
        f"{cell['variant']} {cell['dtype']} b{cell['batch']} h{cell['heads']}{kv} "
        f"n{cell['seq_len']} d{cell['head_dim']}{' causal' if cell['causal'] else ''} "
        f"{cell['pass']}"
    )


# --- resume, provenance, peak -----------------------------------------------------------------
RUN_KEYS = ("results_dir", "run_id", "resume", "report", "report_dir")  # not part of a grid


def resumed_config(cfg, overrides: list[str] | None):
    """A resumed run repeats its own sweep: its saved command, with this command's overrides
    on top (a changed grid then measures only its new cells). Without a saved command (an
    older run, or one not started from a command line), the saved config."""
    run_dir = Path(cfg.results_dir) / str(cfg.resume)
    try:
        meta = res.read_meta(run_dir)
    except (OSError, ValueError):
        return cfg  # check() explains what is missing
    mine = [o for o in overrides or [] if o.lstrip("+~").split("=")[0] not in RUN_KEYS]
    if meta.get("overrides") is not None and overrides is not None:
        merged = compose_config(list(meta["overrides"]) + mine)
    else:
        merged = OmegaConf.create(meta.get("config", {}))
    keep = {"resume": str(cfg.resume), "run_id": str(cfg.resume), "report": bool(cfg.report)}
    merged.merge_with(keep | {"results_dir": cfg.results_dir, "report_dir": cfg.report_dir})
    saved = meta.get("config", {})
    now = OmegaConf.to_container(merged, resolve=True)
    changed = [
        k for k in ("sweep", "device", "variant", "task", "preset") if now.get(k) != saved.get(k)
    ]
    if changed:
        print(f"resume={cfg.resume}: {', '.join(changed)} changed; measuring what is not yet in it")
    commit = res.git_commit()
    if meta.get("git_commit") and meta["git_commit"] != commit:
        print(
            f"resume={cfg.resume}: that run was measured at commit {meta['git_commit']}, this "
            f"code is {commit}; every row records its own commit"
        )
    return merged


def compose_config(overrides: list[str]):
    """The harness config composed from ``overrides`` (inside a Hydra app or not)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .config import CONF_DIR

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def saved_config(cfg) -> dict:
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in ("hydra", "defaults"):
        config.pop(key, None)
    return config


def command(overrides: list[str] | None) -> str | None:
    """The command line that reproduces the run (None when it was not started from one)."""
    if overrides is None:
        return None
    return " ".join(["python -m harness", *(_quoted(o) for o in overrides)])


def _quoted(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " [](){}*?,'\"") else arg


def start_meta(cfg, plan: Plan, run_dir: Path, prov: dict, overrides) -> dict:
    """meta.json: written before the first cell; a resume keeps the original and adds to it."""
    if (run_dir / res.META).exists():
        meta = res.read_meta(run_dir)
        resume = {"started": res.now(), **prov, "command": command(overrides)}
        meta.setdefault("resumes", []).append(resume)
        res.write_meta(run_dir, meta)
        return meta
    meta = {
        **prov,
        "started": res.now(),
        "command": command(overrides),
        "overrides": overrides,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": plan.device,
        "cuda": torch.version.cuda,
        "allocator": plan.allocator if plan.device == "cpu" else "cuda caching allocator",
        "dtypes": plan.dtypes,
        "memory_budget_mb": plan.budget_bytes and plan.budget_bytes / 2**20,
        "variants": [{"name": e.name, "options": e.options} for e in plan.entries],
        "config": saved_config(cfg),
    }
    res.write_meta(run_dir, meta)
    return meta


def finish_meta(meta, record, run_dir: Path, table, counts: Counter, wall_s: float) -> None:
    """What this invocation measured, whether it finished, the status of every row now."""
    record.update(wall_s=round(wall_s, 1), measured=dict(counts))
    if not record.get("interrupted"):
        record["finished"] = res.now()
    meta["status_counts"] = dict(Counter(r["status"] for r in res.pool(table.rows())))
    res.write_meta(run_dir, meta)


def record_patterns(plan: Plan, run_dir: Path, worker: Worker) -> None:
    """Which keys each query sees, for every variant and option set of the run, from this
    code (harness.patterns), into the run folder: the report draws them from there."""
    if res.read_patterns(run_dir) is not None:
        return  # a resume keeps what the run recorded
    entries = [{"name": e.name, "options": e.options} for e in plan.entries]
    answer = worker.run({"kind": "patterns", "entries": entries}, timeout_s=600)
    if answer.get("status") == "ok":
        res.write_patterns(run_dir, answer["patterns"])
    else:
        print(f"patterns: not recorded ({answer.get('reason', answer.get('status'))})")


def measure_peak(meta: dict, plan: Plan, worker: Worker, run_dir: Path) -> None:
    """The machine's matmul GFLOP/s once per run (kept across a resume), in the worker."""
    if meta.get("matmul_peak_gflops"):
        return
    job = {"kind": "matmul_peak", "device": plan.device, "dtypes": plan.dtypes}
    job.update(threads=plan.threads, size=plan.matmul_size)
    answer = worker.run(job, timeout_s=600)
    meta["matmul_peak_gflops"] = answer.get("gflops") or {"error": answer.get("reason")}
    meta["peak_memory"] = "tensor bytes (profiler on CPU, allocator on CUDA)"
    meta["rss_peak"] = "VmHWM (reset per cell)" if worker.resettable else "ru_maxrss"
    meta["allocator_in_use"] = worker.allocator
    res.write_meta(run_dir, meta)

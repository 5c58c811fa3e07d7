"""Refuse bad input before anything runs, with one message that says what to do.

``check(cfg)`` turns a composed config into a :class:`Plan` (the variant entries with their
options, the device, threads and memory budget) or raises :class:`ConfigError`. Nothing is
created on disk here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from omegaconf import OmegaConf

import variants

from . import allocator
from .config import ENTRY_AXES, GRID_OPTIONS
from .measure import DTYPES
from .schema import PASSES


class ConfigError(ValueError):
    """A user error in the configuration: printed as one message, exit code 2."""


@dataclass
class Entry:
    """One variant with one set of options (a variant may appear twice: see sweep.extra)."""

    name: str
    options: dict
    axes: dict  # seq_lens, num_heads, causal of this entry: the sweep's unless an extra narrows


@dataclass
class Plan:
    entries: list[Entry]
    device: str
    threads: int
    budget_bytes: int | None
    dtypes: list[str] = field(default_factory=list)
    matmul_size: int | None = None
    allocator: str = "cached"  # the CPU worker's malloc setting (harness/allocator.py)
    # selector -> injected factor (inject_slowdown): "variant" or "variant@part" (also
    # "variant-part", which Hydra's dotted overrides accept), part one of SLOWDOWN_PARTS
    # ("local@fwd_bwd": only local's fwd_bwd cells)
    slowdown: dict = field(default_factory=dict)

    def slowdown_of(self, cell: dict) -> float:
        """The injected factor of a cell: the product of every selector that matches it."""
        factor = 1.0
        for selector, f in self.slowdown.items():
            name, part = split_selector(selector)
            if name == cell["variant"] and (not part or part in cell_parts(cell)):
                factor *= f
        return factor


SLOWDOWN_PARTS = ("fwd", "fwd_bwd", "decode", "causal", "noncausal")


def split_selector(selector: str) -> tuple[str, str]:
    """``local@fwd_bwd`` or ``local-fwd_bwd`` -> (local, fwd_bwd); ``local`` -> (local, "")."""
    for sep in ("@", "-"):
        if sep in selector:
            name, _, part = selector.partition(sep)
            return name, part
    return selector, ""


def cell_parts(cell: dict) -> set[str]:
    return {cell["pass"], "causal" if cell["causal"] else "noncausal"}


def check(cfg) -> Plan:
    _check_keys(cfg)
    sweep = cfg.sweep
    _check_grid(sweep)
    device = _check_device(cfg.device.name)
    for name in sweep.dtypes:
        _check_dtype(name, device)
    threads = _check_threads(cfg.device.threads)
    malloc = _check_allocator(cfg.device.get("allocator", "cached"), device)
    entries = _entries(cfg)
    for entry in entries:
        _check_heads(entry)
        _check_builds(entry, sweep)
    if cfg.resume:
        _check_resume(cfg)
    else:
        _check_fresh(cfg)
    if cfg.task:
        _check_task(cfg)
    budget = _budget(sweep.memory_budget_mb, device)
    dtypes = [str(d) for d in sweep.dtypes]
    slowdown = _check_slowdown(cfg.get("inject_slowdown") or {}, entries)
    matmul_size = cfg.device.get("matmul_size")
    return Plan(entries, device, threads, budget, dtypes, matmul_size, malloc, slowdown)


# --- the keys ---------------------------------------------------------------------------------
def _check_keys(cfg) -> None:
    """A top-level key the schema does not have (``+no_such_key=1`` slips past Hydra's typing)
    is a typo, not a setting to ignore."""
    from .config import make_config_class

    known = {f.name for f in dataclasses.fields(make_config_class())}
    unknown = sorted(set(cfg.keys()) - known - {"hydra"})
    if unknown:
        valid = ", ".join(sorted(known - {"defaults", "hydra"}))
        raise ConfigError(
            f"unknown key {unknown[0]!r}; the top-level keys are: {valid} "
            "(python -m harness --help lists every key)"
        )


# --- the grid ---------------------------------------------------------------------------------
def _check_grid(sweep) -> None:
    if sweep.get("kind", "speed") not in ("speed", "train_step"):
        raise ConfigError(f"sweep.kind must be speed or train_step, not {sweep.kind!r}")
    if sweep.get("order", "variant") not in ("variant", "shape"):
        raise ConfigError(f"sweep.order must be variant or shape, not {sweep.order!r}")
    if int(sweep.get("rounds", 1)) < 1:
        raise ConfigError(f"sweep.rounds must be >= 1, not {sweep.rounds}")
    _check_axes({k: list(sweep[k]) for k in (*ENTRY_AXES, "batch_sizes", "head_dims")}, "sweep.")
    if not list(sweep.dtypes):
        raise ConfigError("sweep.dtypes is empty")
    if sweep.min_run_time <= 0 or sweep.timeout_s <= 0 or sweep.min_blocks < 1:
        raise ConfigError("sweep.min_run_time and sweep.timeout_s must be > 0, min_blocks >= 1")
    if sweep.memory_budget_mb is not None and sweep.memory_budget_mb <= 0:
        raise ConfigError("sweep.memory_budget_mb must be > 0 (or null for the automatic one)")


def _check_axes(axes: dict, prefix: str) -> None:
    for key, values in axes.items():
        if not values:
            raise ConfigError(f"{prefix}{key} is empty; give at least one value")
        if key == "passes":
            unknown = [p for p in values if p not in PASSES]
            if unknown:
                raise ConfigError(
                    f"unknown pass {unknown[0]!r} in {prefix}{key}; use {', '.join(PASSES)}"
                )
            continue
        if key == "causal":
            continue
        if key == "kv_heads":
            values = [v for v in values if v is not None]
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ConfigError(f"{prefix}{key} must be positive integers; got {bad[0]!r}")


# --- the device -------------------------------------------------------------------------------
def _check_device(name: str) -> str:
    if name == "cpu":
        return name
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not m:
        raise ConfigError(f"unknown device {name!r}; use device=cpu or device=cuda (or cuda:N)")
    if not torch.cuda.is_available():
        build = "this torch is a CPU-only build" if torch.version.cuda is None else "no GPU found"
        raise ConfigError(
            f"device={name} but CUDA is not available here ({build}); "
            "run on a machine with a CUDA GPU, or use device=cpu"
        )
    index = int(m.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device={name}, but only {torch.cuda.device_count()} GPU(s) here")
    return name


def _check_dtype(name: str, device: str) -> None:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r} in sweep.dtypes; use {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if device != "cpu" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU cannot compute in bfloat16; use float16 or float32")
    try:  # ask the device itself: a tiny matmul in that dtype
        a = torch.ones(4, 4, device=device, dtype=dtype)
        (a @ a).sum().item()
    except RuntimeError as e:
        raise ConfigError(f"device {device} cannot compute in {name}: {e}") from None


def _check_slowdown(slowdown, entries) -> dict:
    swept = {e.name for e in entries}
    out = {}
    for selector, factor in dict(slowdown).items():
        name, part = split_selector(selector)
        if name not in swept:
            raise ConfigError(
                f"inject_slowdown.{name}: not a variant of this sweep ({', '.join(sorted(swept))})"
            )
        if part and part not in SLOWDOWN_PARTS:
            raise ConfigError(
                f"inject_slowdown: {selector!r}: after @ give one of {', '.join(SLOWDOWN_PARTS)}"
            )
        if not factor >= 1.0:
            raise ConfigError(f"inject_slowdown.{name}={factor}: a factor must be >= 1")
        out[selector] = float(factor)
    return out


def _check_allocator(name: str, device: str) -> str:
    if torch.device(device).type != "cpu":  # CUDA: its own caching allocator
        return "cached"
    try:
        allocator.library(name)  # a library that is not there, or an unknown name
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return name


def _check_threads(threads) -> int:
    if threads is None:
        return torch.get_num_threads()
    if threads < 1:
        raise ConfigError(
            f"device.threads must be >= 1 (or null for torch's default), not {threads}"
        )
    return threads


def _budget(budget_mb, device: str) -> int | None:
    """The memory a cell may plan to use: given, or a safe share of what the device has."""
    if budget_mb is not None:
        return int(budget_mb * 2**20)
    if device == "cpu":
        return int(0.7 * psutil.virtual_memory().available)
    return int(0.9 * torch.cuda.get_device_properties(torch.device(device)).total_memory)


# --- the variants -----------------------------------------------------------------------------
def _expand(patterns, exclude, where: str = "sweep.variants") -> list[str]:
    """Names and fnmatch patterns ("all" = every registered variant) to registered names.

    ``exclude`` thins out what a pattern matched; a variant named explicitly is always kept
    (``sweep.variants=[local,flex_local]`` runs flex_local although a preset excludes flex_*)."""
    available = variants.available()
    names: list[str] = []
    for pattern in patterns:
        matched = fnmatch.filter(available, "*" if pattern == "all" else pattern)
        if not matched:
            raise ConfigError(
                f"unknown variant {pattern!r} in {where}; available: {', '.join(available)}"
            )
        if pattern != "all" and not any(c in pattern for c in "*?["):
            names += [n for n in matched if n not in names]  # named: never excluded
            continue
        kept = [n for n in matched if not any(fnmatch.fnmatch(n, x) for x in exclude)]
        names += [n for n in kept if n not in names]
    return names


def variant_options(cfg, name: str) -> dict:
    """``variant.<name>`` without the options the grid sets per cell; a variant registered after
    the config was composed (a plugin, a test) gets its dataclass defaults."""
    if name in cfg.variant:
        options = OmegaConf.to_container(cfg.variant[name], resolve=True)
    else:
        options = dataclasses.asdict(variants.config_class(name)())
    return {k: v for k, v in options.items() if k not in GRID_OPTIONS}


def _entries(cfg) -> list[Entry]:
    sweep = cfg.sweep
    axes = {axis: _plain(sweep[axis]) for axis in ENTRY_AXES}
    names = _expand(sweep.variants, sweep.exclude)
    entries = [Entry(n, variant_options(cfg, n), axes) for n in names]
    for extra in sweep.extra:
        own = {a: axes[a] if extra[a] is None else _plain(extra[a]) for a in ENTRY_AXES}
        _check_axes(own, prefix=f"sweep.extra[{extra.variant}].")
        for name in _expand([extra.variant], [], where="sweep.extra"):
            options = {**variant_options(cfg, name), **OmegaConf.to_container(extra.options)}
            entries.append(Entry(name, options, own))
    if not entries:
        raise ConfigError("the sweep has no variants left (sweep.variants minus sweep.exclude)")
    return entries


def _plain(values) -> list:
    return list(OmegaConf.to_container(values)) if OmegaConf.is_config(values) else list(values)


def _check_heads(entry: Entry) -> None:
    for kv in entry.axes["kv_heads"]:
        for heads in entry.axes["num_heads"]:
            if kv is not None and heads % kv:
                raise ConfigError(
                    f"num_heads={heads} is not a multiple of kv_heads={kv} (variant "
                    f"{entry.name}): each key/value head serves num_heads / kv_heads query "
                    "heads; choose sweep.kv_heads among the divisors of every sweep.num_heads"
                )


def _check_builds(entry: Entry, sweep) -> None:
    """Bad option names or values are config errors, found before any cell runs."""
    try:
        variants.build(
            entry.name,
            **entry.options,
            seq_len=min(entry.axes["seq_lens"]),
            num_heads=min(entry.axes["num_heads"]),
            head_dim=min(sweep.head_dims),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"variant {entry.name} with options {entry.options}: {e}") from None


# --- resume and tasks -------------------------------------------------------------------------
def _check_resume(cfg) -> None:
    run_dir = Path(cfg.results_dir) / str(cfg.resume)
    if not (run_dir / "meta.json").exists():
        raise ConfigError(
            f"resume={cfg.resume}: no run there ({run_dir}/meta.json is missing); give the "
            f"run_id of a folder under {cfg.results_dir}/"
        )


def _check_fresh(cfg) -> None:
    """A new run never writes into a run that holds results: rows would mix two runs."""
    run_dir = Path(cfg.results_dir) / str(cfg.run_id)
    if (run_dir / "results.csv").is_file() or (run_dir / "meta.json").is_file():
        raise ConfigError(
            f"run_id={cfg.run_id}: {run_dir} already holds a run; pass resume={cfg.run_id} to "
            "measure only its missing cells, or choose another run_id"
        )


def _check_task(cfg) -> None:
    from .config import CONF_DIR
    from .tasks.run import TASKS

    name = cfg.task.name
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    if not (CONF_DIR / "task" / name / f"{cfg.preset}.yaml").is_file():
        presets = sorted(p.stem for p in (CONF_DIR / "task" / name).glob("*.yaml"))
        raise ConfigError(
            f"task {name} has no preset {cfg.preset!r} (conf/task/{name}/); use preset= one of "
            f"{', '.join(presets)}"
        )
    if not cfg.sweep.seeds:
        raise ConfigError("sweep.seeds is empty; give at least one training seed")

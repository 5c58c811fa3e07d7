"""The harness's structured configs: dataclasses stored in Hydra's ConfigStore.

Every key has a type, so a typo on the command line or in a YAML file fails when the config is
composed, not an hour into a sweep. The ``variant`` node is generated from the registry (one
field per variant, typed with its config dataclass) and the defaults list pulls in every
``conf/variant/<name>.yaml``: a new variant needs its module and its YAML file, nothing here.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

import variants

from .schema import PASSES  # noqa: F401  (the grid's passes, for the help text)
from .tasks.train import TrainConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# grid axes an extra entry may narrow
ENTRY_AXES = ("seq_lens", "num_heads", "kv_heads", "causal", "passes")
GRID_OPTIONS = ("seq_len", "num_heads", "kv_heads", "head_dim")  # set per cell by the grid


@dataclass
class ExtraCell:
    """More cells: a variant with other options than its ``variant.<name>`` ones (``sparse``
    with ``pattern: bigbird`` beside the default ``fixed``), or on a narrower grid (compiled
    twins at fewer shapes, since each new shape compiles again)."""

    variant: str = MISSING  # a name or an fnmatch pattern ("flex_*")
    options: dict[str, Any] = field(default_factory=dict)  # merged over variant.<name>
    seq_lens: list[int] | None = None  # None: the sweep's list (likewise below)
    num_heads: list[int] | None = None
    kv_heads: list[int | None] | None = None
    causal: list[bool] | None = None
    passes: list[str] | None = None


@dataclass
class ModelSize:
    """The encoder a ``train_step`` sweep times (harness/tasks/model.py): LRA's byte-level text
    classifier by default (its base_tc_config: 4 layers of width 256, 4 heads, MLP 1024)."""

    vocab_size: int = 257  # bytes, plus padding
    num_classes: int = 2
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1
    per_token: bool = False
    pad_id: int | None = 0


@dataclass
class SweepConfig:
    name: str = "custom"  # the preset's name, recorded in meta.json
    # "speed": attention calls over the grid below; "train_step": whole training steps of the
    # encoder of `model` (Long Range Arena's Table 2 protocol) over variants, dtypes,
    # batch_sizes and seq_lens
    kind: str = "speed"
    model: ModelSize = field(default_factory=ModelSize)  # train_step: the model timed
    task_name: str = "text"  # train_step: the task the model is sized for, recorded per row
    # Registered names or fnmatch patterns; "all" is every registered variant. Variants that
    # cannot run a case are still swept: they give `unsupported` rows, never silent gaps.
    variants: list[str] = field(default_factory=lambda: ["all"])
    exclude: list[str] = field(default_factory=list)  # names or patterns taken out of `variants`
    extra: list[ExtraCell] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=lambda: [256, 1024])
    num_heads: list[int] = field(default_factory=lambda: [4])
    # key/value heads (GQA/MQA): each must divide every num_heads; null: as many as num_heads
    kv_heads: list[int | None] = field(default_factory=lambda: [None])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    head_dims: list[int] = field(default_factory=lambda: [64])
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    causal: list[bool] = field(default_factory=lambda: [False])  # decode cells are causal
    # fwd, fwd_bwd, decode (one token against the state of a seq_len prompt)
    passes: list[str] = field(default_factory=lambda: ["fwd", "fwd_bwd"])
    min_run_time: float = 0.2  # seconds of timed blocks per cell (blocked_autorange)
    min_blocks: int = 5  # at least this many timed blocks, so the IQR means something
    timeout_s: float = 300.0  # per cell, compilation included; over it: a `timeout` row
    memory_budget_mb: float | None = None  # None: 70% of free RAM (CPU), 90% of the GPU's memory
    # "variant": all cells of a variant in a row; "shape": all variants of one shape in a row,
    # so that a cell and the reference it is divided by (harness.compare) are measured seconds
    # apart, not minutes, on a machine whose speed drifts
    order: str = "variant"
    rounds: int = 1  # measure the grid this many times over, pooling each cell's samples
    patterns: bool = True  # record each variant's attention pattern (patterns.json) at the end
    seed: int = 0  # seeds the random q, k, v of every cell
    # accuracy tasks: one training run per seed (its batch order and initial weights; the data
    # come from task.data_seed), one accuracy row each
    seeds: list[int] = field(default_factory=lambda: [0])


@dataclass
class DeviceConfig:
    name: str = "cpu"  # "cpu", "cuda" or "cuda:<index>"
    threads: int | None = None  # torch CPU threads in the worker; None: torch's default
    matmul_size: int | None = None  # n of the n x n matmul peak; None: 2048 (CPU), 8192 (CUDA)
    # the CPU worker's malloc: cached (glibc keeping freed memory), system (stock glibc),
    # jemalloc, or a library's path (harness/allocator.py)
    allocator: str = "cached"


@dataclass
class TaskConfig:
    """An accuracy task (harness/tasks), composed from conf/task/<task>.yaml and
    conf/task/<task>/<preset>.yaml; every key can be overridden (task.train.max_steps=500)."""

    name: str = MISSING  # listops, mqar or pathfinder
    data: dict[str, Any] = field(default_factory=dict)  # the generator's options (its Config)
    train_data: dict[str, Any] = field(default_factory=dict)  # generator options, train only
    sizes: list[int] = field(default_factory=lambda: [1000, 200, 200])  # train, val, test
    data_seed: int = 0  # the examples (every training seed sees the same data)
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields the task does not fix
    train: TrainConfig = field(default_factory=TrainConfig)
    # lengths of the approximation-error rows on random q, k, v (the trained ones use the task's)
    approx_seq_lens: list[int] = field(default_factory=lambda: [256])
    timeout_s: float = 900.0  # per variant and seed: over it, a `timeout` row


def variants_config() -> type:
    """A dataclass with one field per registered variant, typed with its config class."""
    fields = []
    for name in variants.available():
        cls = variants.config_class(name)
        fields.append((name, cls, field(default_factory=cls)))
    return dataclasses.make_dataclass("VariantsConfig", fields)


def defaults_list() -> list[Any]:
    """Every variant's YAML at ``variant.<name>``, generated so no name is listed by hand."""
    entries: list[Any] = ["_self_", {"device": "cpu"}, {"sweep": "default"}, {"preset": "ci"}]
    for name in variants.available():
        if (CONF_DIR / "variant" / f"{name}.yaml").exists():  # the dataclass defaults otherwise
            entries.append({f"variant@variant.{name}": name})
    # task=<task> picks conf/task/<task>.yaml, then its preset conf/task/<task>/<preset>.yaml
    # through the group task_preset (conf/task_preset links to conf/task: Hydra interpolates
    # only group choices, and one group cannot be chosen twice)
    entries += [{"optional task": None}, {"optional task_preset": "${task}/${preset}"}]
    return entries


def hydra_settings() -> dict:
    """Hydra's own output (config, overrides, log) of a single run goes to a scratch folder:
    the run's meta.json records its config and command, and a run refused before it starts
    (a held folder, a typo) must write nothing into results. A multirun (``-m``) gets one
    folder, ``<results_dir>/multirun-<id>/``, that every job's run folder goes into
    (harness.__main__ points the jobs' results_dir there), each with its job's ``.hydra``, so
    that ``python -m harness.report`` on it merges the jobs."""
    return {
        "run": {"dir": "${oc.env:TMPDIR,/tmp}/attnbench-hydra/${run_id}"},
        "sweep": {
            "dir": "${results_dir}/multirun-${harness_run_id:}",  # the id: cached, one per multirun
            "subdir": "${run_id}/.hydra",
        },
        "output_subdir": ".",  # relative to the dirs above: no .hydra/.hydra nesting
        "job": {"chdir": False},
        "help": {"app_name": "python -m harness", "header": HELP_HEADER, "footer": HELP_FOOTER},
    }


HELP_HEADER = """python -m harness [key=value ...]: measure attention variants (latency, peak
memory, FLOPs) over a grid; one row per cell in <results_dir>/<run_id>/results.csv.
Presets: sweep=default|ci|scaling|gpu, device=cpu|cuda. The `variant` group below holds each
variant's options (variant.local.window=64), it is not a selector: use sweep.variants=[...]."""

HELP_FOOTER = """Examples:
  python -m harness sweep=ci
  python -m harness sweep.variants=[full,local] sweep.seq_lens=[1024,2048] variant.local.window=64
  python -m harness resume=<run_id>          (measure only the cells still missing)
  python -m harness task=mqar preset=cpu     (accuracy rows, harness/tasks)
  python -m harness -m sweep.variants=[full],[local] hydra/launcher=slurm   (docs/cluster.md)"""


def new_run_id(resume: str | None = None) -> str:
    """A resumed run keeps its id; a new one is its start time plus a short random tag (two
    runs started in the same second must not share a folder). Also a multirun's id."""
    if resume:
        return str(resume)
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def make_config_class() -> type:
    variant_node = variants_config()
    return dataclasses.make_dataclass(
        "Config",
        [
            ("defaults", list[Any], field(default_factory=defaults_list)),
            ("sweep", SweepConfig, field(default_factory=SweepConfig)),
            ("device", DeviceConfig, field(default_factory=DeviceConfig)),
            ("variant", variant_node, field(default_factory=variant_node)),
            ("results_dir", str, field(default="results")),
            # Interpolated once per composed config (the resolver is cached), so Hydra's output
            # dir and the results folder agree.
            ("run_id", str, field(default="${harness_run_id:${resume}}")),
            ("resume", str | None, field(default=None)),  # a run_id: measure only missing cells
            ("report", bool, field(default=True)),  # render harness.report's page at the end
            # where that page goes; null: <results_dir>/<run_id>/report/
            ("report_dir", str | None, field(default=None)),
            # an accuracy task instead of a speed sweep: task=<listops|mqar|pathfinder>
            ("task", TaskConfig | None, field(default=None)),
            ("preset", str, field(default="ci")),  # the task's budget: ci, cpu or gpu
            # variant -> factor: its timed calls made that many times slower by a busy wait, to
            # show that harness.compare catches a known regression (never in a real run)
            ("inject_slowdown", dict[str, float], field(default_factory=dict)),
            ("hydra", Any, field(default_factory=hydra_settings)),
        ],
    )


def register_configs() -> None:
    """Store the schemas (idempotent: tests may call it again after registering a variant)."""
    OmegaConf.register_new_resolver("harness_run_id", new_run_id, use_cache=True, replace=True)
    ConfigStore.instance().store(name="config", node=make_config_class())


register_configs()

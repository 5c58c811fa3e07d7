"""Train and test variants on one task: one job per (variant, seed) in the measuring worker, so a
crash, a hang or an out-of-memory costs one row, never the sweep.

``run_task`` (the sweep's side) turns the composed config into jobs and their rows into the
results table; ``train_job`` (the worker's side) trains one model and returns its rows: the
accuracy row, the approximation error of its own trained attention on its own inputs, and a
``train_step`` row: the speed of a training step of that very model and option set, so the
report can put accuracy beside speed for exactly what was trained.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter

import torch

import variants

from . import approx, listops, mqar, pathfinder
from .common import IGNORE
from .model import Encoder, ModelConfig
from .train import TrainConfig, train

TASKS = ("listops", "mqar", "pathfinder")
GENERATORS = {"listops": listops.generate, "mqar": mqar.generate, "pathfinder": pathfinder.generate}


# --- what a task fixes ------------------------------------------------------------------------
def task_shape(task: str, data: dict) -> dict:
    """The ModelConfig fields the task decides: vocabulary, length, classes and head kind."""
    if task == "listops":
        c = listops.ListOpsConfig(**data)
        return dict(
            vocab_size=listops.VOCAB_SIZE,
            seq_len=c.max_len,
            num_classes=listops.NUM_CLASSES,
            per_token=False,
            pad_id=listops.PAD,
        )
    if task == "mqar":
        c = mqar.MQARConfig(**data)
        return dict(
            vocab_size=c.vocab_size,
            seq_len=c.seq_len,
            num_classes=c.vocab_size,
            per_token=True,
            pad_id=None,
        )
    if task == "pathfinder":
        c = pathfinder.PathfinderConfig(**data)
        # background pixels are zeros but not padding: the pooled mean covers every pixel
        return dict(
            vocab_size=c.levels,
            seq_len=c.size * c.size,
            num_classes=pathfinder.NUM_CLASSES,
            per_token=False,
            pad_id=None,
        )
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def model_config(task: dict) -> ModelConfig:
    return ModelConfig(**task_shape(task["name"], task["data"]), **task["model"])


def train_config(task: dict, seed: int) -> TrainConfig:
    return TrainConfig(**{**task["train"], "seed": seed})


@functools.lru_cache(maxsize=6)
def _split(name: str, data_json: str, size: int, split: str, seed: int):
    return GENERATORS[name](split, size, seed, **json.loads(data_json))


def split_data(task: dict, split: str):
    """(tokens, labels) of one split, generated once per process and shared by every variant
    and training seed (the data seed is the task's, not the training run's)."""
    size = dict(zip(("train", "val", "test"), task["sizes"], strict=True))[split]
    data = task["data"] | (task.get("train_data") or {} if split == "train" else {})
    return _split(task["name"], json.dumps(data, sort_keys=True), size, split, task["data_seed"])


def dataset(task: dict) -> dict:
    return {s: split_data(task, s) for s in ("train", "val", "test")}


def majority_baseline(task: dict) -> float:
    """Test accuracy of always answering the test split's most common label (per MQAR query)."""
    labels = split_data(task, "test")[1]
    seen = labels[labels != IGNORE].tolist()
    return Counter(seen).most_common(1)[0][1] / len(seen)


def chance_level(task: dict) -> float:
    """Accuracy of a uniform guess among the classes a target can take."""
    if task["name"] == "mqar":
        return 1 / mqar.MQARConfig(**task["data"]).num_values
    return 1 / task_shape(task["name"], task["data"])["num_classes"]


# --- the worker's side ------------------------------------------------------------------------
def build_model(task: dict, name: str, options: dict, device, tcfg: TrainConfig) -> Encoder:
    """The encoder around variant ``name``; raises Unsupported, before any data is made, when
    the variant declares it cannot run the task's case."""
    mcfg = model_config(task)
    torch.manual_seed(tcfg.seed)  # the same initial weights whatever ran before in the process
    model = Encoder(mcfg, name, options)
    attn = model.attentions[0]
    reasons = attn.unsupported(device=device, dtype=tcfg.dtype, causal=False, seq_len=mcfg.seq_len)
    reasons += attn.backward_unsupported(device=device)  # training needs the backward too
    if reasons:
        raise variants.Unsupported(f"{name}: " + "; ".join(reasons))
    return model


def train_job(job: dict) -> dict:
    """The worker's job of kind ``task``: train ``job["variant"]`` with ``job["options"]`` on
    ``job["task"]`` from seed ``job["seed"]``; returns the accuracy fields and the other rows."""
    task, name, options, device = job["task"], job["variant"], job["options"], job["device"]
    tcfg = train_config(task, job["seed"])
    torch.set_num_threads(job["threads"])
    model = build_model(task, name, options, device, tcfg)
    data = dataset(task)
    result = train(model, data, tcfg, device)
    fields = ("accuracy", "val_accuracy", "steps", "best_step", "stopped", "train_s", "params")
    rows = list(approx.trained_rows(model, data["test"][0], name, options))
    if job.get("random_approx"):
        mcfg = model_config(task)
        rows += approx.random_rows(
            name, options, task["approx_seq_lens"], mcfg.num_heads, mcfg.d_model // mcfg.num_heads
        )
    rows.append(speed_row(task, name, options, device, tcfg, job))
    return {"status": "ok", **{k: result[k] for k in fields}, "rows": rows}


def speed_row(task: dict, name: str, options: dict, device, tcfg: TrainConfig, job) -> dict:
    """One training step of this task's model with this option set, timed as a train_step
    cell (harness.train_step): the speed of exactly what was trained."""
    from harness import train_step

    mcfg = dataclasses.asdict(model_config(task))
    seq_len = mcfg.pop("seq_len")
    spec = {
        "kind": "train_step",
        "task": task["name"],
        "variant": name,
        "options": options,
        "device": device,
        "dtype": str(tcfg.dtype).removeprefix("torch."),
        "batch": tcfg.batch_size // tcfg.accum_steps,
        "seq_len": seq_len,
        "model": mcfg,
        "threads": job["threads"],
        "min_run_time": 0.5,
        "min_blocks": 3,
        "seed": tcfg.seed,
    }
    try:
        measured = train_step.measure_step(spec)
    except Exception as e:  # the accuracy row stands; the speed row says why it is missing
        from harness.cell import failure

        measured = failure(e)
    row = {k: v for k, v in spec.items() if k not in ("threads", "min_run_time", "min_blocks")}
    return {**row, **measured, "options": json.dumps(options, sort_keys=True)}


# --- the sweep's side -------------------------------------------------------------------------
def run_task(cfg, plan, table, prov, worker) -> Counter:
    """Accuracy rows (one per variant and seed) and the rows that come with them, into the
    run's results table; keys already there are skipped (a resumed run adds nothing twice)."""
    from omegaconf import OmegaConf

    from harness import results as res
    from harness.cell import origin_of

    task = OmegaConf.to_container(cfg.task, resolve=True)
    seeds = list(cfg.sweep.seeds)
    done = table.done("accuracy")
    counts: Counter = Counter()
    for entry in plan.entries:
        for i, seed in enumerate(seeds):
            row = accuracy_row(task, entry.name, entry.options, plan.device, seed)
            if res.row_key(row) in done:
                continue
            job = {"kind": "task", "task": task, "variant": entry.name, "options": entry.options}
            job.update(seed=seed, device=plan.device, threads=plan.threads, random_approx=i == 0)
            job["origin"] = origin_of(variants.build(entry.name, seq_len=64), entry.name)
            result = worker.run(job, task["timeout_s"])
            extra = result.pop("rows", [])
            row.update(result)
            for r in [row, *extra]:
                r = {**r, "kind": r.get("kind") or "approx", "task": task["name"]}
                r.setdefault("seed", seed)
                r.setdefault("device", str(plan.device))  # approx rows: measured there too
                table.append({**r, **prov, "timestamp": res.now()})
            counts[row["status"]] += 1
    return counts


def accuracy_row(task: dict, name: str, options: dict, device, seed: int) -> dict:
    tcfg = train_config(task, seed)
    return {
        "kind": "accuracy",
        "task": task["name"],
        "variant": name,
        "options": json.dumps(options, sort_keys=True),
        "device": str(device),
        "dtype": str(tcfg.dtype).removeprefix("torch."),
        "seq_len": model_config(task).seq_len,
        "seed": seed,
        "status": "ok",
        "reason": "",
    }

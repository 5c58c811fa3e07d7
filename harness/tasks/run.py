"""Train and evaluate every variant of a sweep on one task: one accuracy row per variant, then
the approximation-error rows. Failures are rows (unsupported, oom, error), never crashes."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter
from collections.abc import Iterator

import torch

import variants

from . import approx, listops, mqar, pathfinder, presets
from .common import IGNORE
from .model import Encoder, ModelConfig
from .train import TrainConfig, train

TASKS = ("listops", "mqar", "pathfinder")
GENERATORS = {"listops": listops.generate, "mqar": mqar.generate, "pathfinder": pathfinder.generate}
COMMON = ("seq_len", "num_heads", "head_dim")  # fixed by the task's model, not by the sweep


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


@functools.lru_cache(maxsize=6)
def split_data(task: str, preset: str, split: str, seed: int):
    """(tokens, labels) of one split, generated once per process and shared by every variant."""
    spec = presets.get(task, preset)
    n = dict(zip(("train", "val", "test"), spec.sizes, strict=True))[split]
    data = spec.data | (spec.train_data if split == "train" else {})
    return GENERATORS[task](split, n, seed, **data)


def dataset(task: str, preset: str, seed: int) -> dict:
    return {s: split_data(task, preset, s, seed) for s in ("train", "val", "test")}


def majority_baseline(task: str, preset: str, seed: int = 0) -> float:
    """Test accuracy of always answering the test split's most common label (per MQAR query)."""
    labels = split_data(task, preset, "test", seed)[1]
    seen = labels[labels != IGNORE].tolist()
    return Counter(seen).most_common(1)[0][1] / len(seen)


def chance_level(task: str, preset: str) -> float:
    """Accuracy of a uniform guess among the classes a target can take."""
    spec = presets.get(task, preset)
    if task == "mqar":
        return 1 / mqar.MQARConfig(**spec.data).num_values
    return 1 / task_shape(task, spec.data)["num_classes"]


def resolve_options(spec: presets.TaskPreset, name: str, given: dict | None) -> dict:
    """The task's options for ``name`` (only those the variant has), overridden by ``given``.

    The length-tied options (seq_len, num_heads, head_dim) are the model's, so a sweep's value
    for them is dropped rather than allowed to contradict the model.
    """
    known = set(variants.option_names(name)) if name in variants.available() else set()
    task = {k: v for k, v in spec.options.get(name, {}).items() if k in known}
    return task | {k: v for k, v in (given or {}).items() if k not in COMMON}


def _model_config(task: str, spec: presets.TaskPreset) -> ModelConfig:
    return ModelConfig(**task_shape(task, spec.data), **spec.model)


def _norm(key) -> tuple:
    """Keys compare as strings: a resumed run reads them back from CSV."""
    return tuple(str(k) for k in key)


def row_key(row: dict) -> tuple:
    """What identifies a task row in ``done``: (task, variant, seq_len, seed) for accuracy rows,
    ("approx", task, variant, seq_len, input) for approximation rows."""
    if row.get("kind") == "approx":
        return ("approx", row["task"], row["variant"], row["seq_len"], row["input"])
    return (row["task"], row["variant"], row["seq_len"], row["seed"])


def _fail(row: dict, e: BaseException) -> dict:
    if isinstance(e, variants.Unsupported):
        return row | {"status": "unsupported", "reason": str(e)}
    if isinstance(e, torch.OutOfMemoryError):
        return row | {"status": "oom", "reason": str(e).splitlines()[0][:300]}
    return row | {"status": "error", "reason": f"{type(e).__name__}: {e}"[:500]}


def build_model(task, spec, name, options, device, tcfg: TrainConfig) -> Encoder:
    """The encoder around variant ``name``; raises Unsupported, before any data is made, when
    the variant declares it cannot run the task's case."""
    mcfg = _model_config(task, spec)
    torch.manual_seed(tcfg.seed)  # the same initial weights whatever ran before in the process
    model = Encoder(mcfg, name, options)
    attn = model.attentions[0]
    reasons = attn.unsupported(device=device, dtype=tcfg.dtype, causal=False, seq_len=mcfg.seq_len)
    if hasattr(attn, "backward_unsupported"):  # training needs the backward too (flex on CPU)
        reasons += attn.backward_unsupported(device=device)
    if reasons:
        raise variants.Unsupported(f"{name}: " + "; ".join(reasons))
    return model


def _capture(model, data) -> tuple:
    return approx.capture_qkv(model, data["test"][0][:8])


def _brief_qkv(task, spec, data, device, tcfg) -> tuple:
    """q, k, v from a briefly trained ``full`` model, when none was trained in this run."""
    short = dataclasses.replace(
        tcfg,
        max_steps=spec.approx_train_steps,
        eval_every=spec.approx_train_steps,
        target_accuracy=None,
    )
    model = build_model(task, spec, approx.REFERENCE, {}, device, short)
    train(model, data, short, device)
    return _capture(model, data)


def run_task(
    task: str,
    preset: str,
    variant_names: list[str],
    variant_options: dict[str, dict],
    device: str = "cpu",
    done: set = frozenset(),
    seed: int | None = None,
) -> Iterator[dict]:
    """One accuracy row per variant (skipping keys in ``done``, see row_key), then the approx
    rows. ``seed`` defaults to the preset's training seed; it also picks the data."""
    spec = presets.get(task, preset)
    tcfg = spec.train if seed is None else dataclasses.replace(spec.train, seed=seed)
    seq_len = task_shape(task, spec.data)["seq_len"]
    finished = {_norm(k) for k in done}
    opts = {n: resolve_options(spec, n, variant_options.get(n)) for n in variant_names}
    trained_qkv = None
    for name in variant_names:
        row = {
            "kind": "accuracy",
            "task": task,
            "variant": name,
            "options": json.dumps(opts[name], sort_keys=True),
            "device": str(device),
            "dtype": str(tcfg.dtype).removeprefix("torch."),
            "seq_len": seq_len,
            "status": "ok",
            "reason": "",
            "accuracy": None,
            "steps": None,
            "train_s": None,
            "params": None,
            "seed": tcfg.seed,
        }
        if _norm(row_key(row)) in finished:
            continue
        try:
            model = build_model(task, spec, name, opts[name], device, tcfg)
            data = dataset(task, preset, tcfg.seed)
            result = train(model, data, tcfg, device)
            row |= {k: result[k] for k in ("accuracy", "steps", "train_s", "params")}
            if approx.is_reference(name, opts[name]):
                trained_qkv = _capture(model, data)
            del model
        except Exception as e:  # one variant's failure is its row, the others still run
            row = _fail(row, e)
        _free(device)
        yield row
    yield from _approx(task, preset, spec, variant_names, opts, device, tcfg, finished, trained_qkv)


def _approx(task, preset, spec, names, opts, device, tcfg, finished, trained_qkv):
    """Approx rows for what is not yet in ``finished``; trains a brief ``full`` for the q, k, v
    only when a trained-input row is still missing and no ``full`` was trained above."""
    seq_len = task_shape(task, spec.data)["seq_len"]
    skip = lambda name, n, kind: _norm(("approx", task, name, n, kind)) in finished
    missing = [
        n for n in names if not approx.is_reference(n, opts[n]) and not skip(n, seq_len, "trained")
    ]
    extra = {"task": task, "dtype": "float32", "seed": tcfg.seed}
    if missing and trained_qkv is None:
        try:
            trained_qkv = _brief_qkv(task, spec, dataset(task, preset, tcfg.seed), device, tcfg)
        except Exception as e:  # without q, k, v the trained rows say why
            for name in missing:
                yield _fail(
                    {
                        "kind": "approx",
                        "variant": name,
                        "input": "trained",
                        "seq_len": seq_len,
                        "device": str(device),
                        "approx_error": None,
                        "options": json.dumps(opts[name], sort_keys=True),
                    }
                    | extra,
                    e,
                )
    mcfg = _model_config(task, spec)
    rows = approx.approx_rows(
        names,
        opts,
        seq_lens=spec.approx_seq_lens,
        trained_qkv=trained_qkv,
        device=device,
        heads=mcfg.num_heads,
        head_dim=mcfg.d_model // mcfg.num_heads,
        seed=tcfg.seed,
        skip=skip,
    )
    for row in rows:
        yield row | extra


def _free(device) -> None:
    """Release one variant's memory before the next one trains."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()

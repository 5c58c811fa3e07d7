"""The accuracy side (harness/tasks): generator invariants checked by independent code, the
encoder's use of the registry, the trainer, approximation error, and run_task's rows."""

from __future__ import annotations

import statistics
from collections import deque

import pytest
import torch
from omegaconf import OmegaConf

import harness.config as hconfig
import variants
from harness import results
from harness.sweep import compose_config, run
from harness.tasks import TASKS, approx, chance_level, listops, majority_baseline, mqar, pathfinder
from harness.tasks.model import Encoder, ModelConfig
from harness.tasks.run import task_shape
from harness.tasks.train import TrainConfig, lr_factor, train

PRESETS = sorted(p.stem for p in (hconfig.CONF_DIR / "preset").glob("*.yaml"))

# --- ListOps -------------------------------------------------------------------------------
LISTOPS = {"min_len": 20, "max_len": 80, "max_depth": 4, "max_args": 5}


def evaluate(text: str) -> tuple[int, int, int]:
    """A separate evaluator: the value, the deepest nesting and the most arguments of one
    bracketed expression, by a stack over its words (the generator builds trees recursively)."""
    ops = {
        "[MIN": min,
        "[MAX": max,
        "[MED": lambda a: int(statistics.median(a)),
        "[SM": lambda a: sum(a) % 10,
    }
    stack, value, depth, most = [], None, 0, 0
    for word in text.split():
        if word in ops:
            stack.append((ops[word], []))
            depth = max(depth, len(stack))
        elif word == "]":
            fn, args = stack.pop()
            most = max(most, len(args))
            value = fn(args)
            if stack:
                stack[-1][1].append(value)
        else:
            stack[-1][1].append(int(word))
    assert not stack, "unbalanced brackets"
    return value, depth, most


def test_listops_labels_match_a_separate_evaluator():
    tokens, labels = listops.generate("train", 300, seed=1, **LISTOPS)
    assert tokens.shape == (300, LISTOPS["max_len"]) and labels.shape == (300,)
    for row, label in zip(tokens, labels, strict=True):
        value, depth, most = evaluate(listops.decode(row))
        assert value == label
        assert 1 <= depth <= LISTOPS["max_depth"]
        assert 2 <= most <= LISTOPS["max_args"]


def test_listops_lengths_in_range_and_padded_at_the_end():
    tokens, _ = listops.generate("val", 300, seed=2, **LISTOPS)
    lengths = (tokens != listops.PAD).sum(1)
    assert lengths.min() >= LISTOPS["min_len"] and lengths.max() <= LISTOPS["max_len"]
    for row, n in zip(tokens, lengths, strict=True):
        assert (row[n:] == listops.PAD).all()  # padding only after the expression
    assert len(set(listops.generate("val", 300, seed=2, **LISTOPS)[1].tolist())) == 10


def test_listops_impossible_range_says_why():
    with pytest.raises(ValueError, match="widen the range"):
        listops.generate("train", 1, min_len=60, max_len=70, max_depth=1, max_args=3, max_tries=50)


# --- MQAR -----------------------------------------------------------------------------------
MQAR = {"seq_len": 48, "num_kv_pairs": 6, "vocab_size": 40}
# the invariants of the layout (pairs anywhere in the context, answers beside their keys) are
# checked in tests/test_shortcuts.py


# --- Pathfinder -----------------------------------------------------------------------------
PATHFINDER = {"size": 20, "contour_length": 5, "num_distractors": 3, "levels": 16}


def dots(image: torch.Tensor, top: int) -> list[set]:
    """The marker blobs: 8-connected groups of full-intensity pixels."""
    left = {(y, x) for y, x in (image == top).nonzero().tolist()}
    groups = []
    while left:
        todo, group = [left.pop()], set()
        while todo:
            y, x = todo.pop()
            group.add((y, x))
            for p in [(y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]:
                if p in left:
                    left.remove(p)
                    todo.append(p)
        groups.append(group)
    return groups


def connected(image: torch.Tensor, a: set, b: set, reach: int) -> bool:
    """Breadth-first search over non-zero pixels, stepping at most ``reach`` pixels (Chebyshev),
    so a dashed curve's gaps are crossed but background wider than a gap is not."""
    on = {(y, x) for y, x in (image != 0).nonzero().tolist()}
    seen, todo = set(a), deque(a)
    while todo:
        y, x = todo.popleft()
        if (y, x) in b:
            return True
        for dy in range(-reach, reach + 1):
            for dx in range(-reach, reach + 1):
                p = (y + dy, x + dx)
                if p in on and p not in seen:
                    seen.add(p)
                    todo.append(p)
    return False


@pytest.mark.parametrize("gap", [1, 0])
def test_pathfinder_dots_joined_exactly_in_positives(gap):
    cfg = pathfinder.PathfinderConfig(**PATHFINDER, gap=gap)
    tokens, labels = pathfinder.generate("test", 120, seed=4, **PATHFINDER, gap=gap)
    assert tokens.shape == (120, cfg.size**2)
    assert int(labels.sum()) == 60  # balanced
    for row, label in zip(tokens, labels, strict=True):
        image = row.view(cfg.size, cfg.size).long()
        blobs = dots(image, cfg.levels - 1)
        assert len(blobs) == 2 and all(len(g) == 9 for g in blobs)
        assert connected(image, blobs[0], blobs[1], reach=gap + 1) == bool(label)


def test_pathfinder_lra_default_fits_and_crowding_says_why():
    tokens, labels = pathfinder.generate("train", 8, seed=0)  # 32x32, contour length 14
    assert tokens.shape == (8, 1024) and int(labels.sum()) == 4
    with pytest.raises(ValueError, match="do not fit"):
        pathfinder.generate("train", 2, size=8, contour_length=8, max_tries=3)


# --- every generator ------------------------------------------------------------------------
GENERATORS = [(listops.generate, LISTOPS), (mqar.generate, MQAR), (pathfinder.generate, PATHFINDER)]


@pytest.mark.parametrize("gen, cfg", GENERATORS)
def test_generators_are_deterministic_per_seed_and_split(gen, cfg):
    a, b = gen("train", 16, 7, **cfg), gen("train", 16, 7, **cfg)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], gen("val", 16, 7, **cfg)[0])
    assert not torch.equal(a[0], gen("train", 16, 8, **cfg)[0])


def task_config(task: str, preset: str, *more: str):
    return compose_config([f"task={task}", f"preset={preset}", *more])


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("task", TASKS)
def test_every_preset_generates_and_builds(task, preset):
    cfg = task_config(task, preset)
    spec = OmegaConf.to_container(cfg.task)
    assert cfg.task.name == task and cfg.preset == preset and spec["data"] and spec["sizes"]
    tokens, labels = GENERATORS[TASKS.index(task)][0]("val", 2, 0, **spec["data"])
    shape = task_shape(task, spec["data"])
    assert tokens.shape == (2, shape["seq_len"]) and int(tokens.max()) < shape["vocab_size"]
    assert int(labels.max()) < shape["num_classes"]
    ModelConfig(**shape, **spec["model"])  # the sizes are a valid model
    TrainConfig(**spec["train"])


def test_task_configs_are_ordinary_overridable_settings():
    cfg = task_config("mqar", "cpu", "task.train.max_steps=500", "task.data.seq_len=128")
    assert cfg.task.train.max_steps == 500 and cfg.task.data.seq_len == 128
    assert cfg.variant.local.window == 8  # the preset scales the window to its 64 tokens
    explicit = task_config("mqar", "cpu", "variant.local.window=128")  # equal to the default
    assert explicit.variant.local.window == 128  # and still wins: nothing thrown away
    assert compose_config([]).task is None  # a speed sweep has no task


# --- model and training ---------------------------------------------------------------------
def tiny_config(**kw):
    base = dict(vocab_size=12, seq_len=32, num_classes=5, d_model=16, num_layers=2, num_heads=2)
    return ModelConfig(**(base | kw))


@pytest.mark.parametrize("name, options", [("full", {}), ("local", {"window": 4})])
def test_model_attention_is_the_registered_variant(name, options, monkeypatch):
    if name not in variants.available():
        pytest.skip(f"{name} is not registered yet")
    calls = []
    real = variants.build
    monkeypatch.setattr(variants, "build", lambda n, **o: calls.append((n, o)) or real(n, **o))
    model = Encoder(tiny_config(), name, options)
    assert [n for n, _ in calls] == [name, name]
    assert calls[0][1] == dict(seq_len=32, num_heads=2, head_dim=8, **options)
    assert all(isinstance(a, variants.Attention) and a.name == name for a in model.attentions)
    tokens = torch.randint(12, (3, 32))
    assert model(tokens).shape == (3, 5)
    per_token = Encoder(tiny_config(per_token=True), name, options)
    assert per_token(tokens).shape == (3, 32, 5)


def test_lr_warms_up_then_decays():
    cfg = TrainConfig(warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))  # never rises after warm-up
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_train_learns_keeps_the_best_and_writes_a_checkpoint(tmp_path):
    torch.manual_seed(0)  # a learnable toy: the class is the first token
    x = torch.randint(1, 5, (400, 8))
    y = x[:, 0] - 1
    data = {
        "train": (x[:200], y[:200]),
        "val": (x[200:300], y[200:300]),
        "test": (x[300:], y[300:]),
    }
    model = Encoder(tiny_config(seq_len=8, num_classes=4, dropout=0.0, pad_id=None), "full")
    cfg = TrainConfig(
        batch_size=20,
        accum_steps=2,
        lr=1e-2,
        warmup_steps=5,
        max_steps=60,
        eval_every=10,
        patience=3,
        target_accuracy=0.95,
    )
    out = train(model, data, cfg, ckpt_dir=tmp_path)
    assert out["accuracy"] >= 0.9 and out["val_accuracy"] >= 0.95 and out["stopped"] == "target"
    assert out["steps"] == out["best_step"] <= 60 and out["params"] > 0
    saved = torch.load(tmp_path / "best.pt")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


# --- approximation error --------------------------------------------------------------------
def test_approx_error_of_exact_attention_is_rounding():
    q, k, v = approx.random_qkv(96, heads=2, head_dim=8)
    chunked = variants.build("full", chunk_size=16)
    assert approx.error_of(chunked, q, k, v) < 1e-5
    assert approx.error_of(variants.build("sdpa"), q, k, v) < 1e-5
    with pytest.raises(variants.Unsupported):
        approx.error_of(variants.build("xformers"), q, k, v)  # no CPU kernels
    local = variants.build("local", window=4)
    assert approx.error_of(local, q, k, v) > 0.05  # a narrow window drops most of the mass


def test_capture_qkv_reads_the_first_layer():
    model = Encoder(tiny_config(), "full")
    q, k, v = approx.capture_qkv(model, torch.randint(12, (3, 32)))
    assert q.shape == k.shape == v.shape == (3, 2, 32, 8)
    assert approx.error_of(variants.build("full", chunk_size=8), q, k, v) < 1e-5


def test_random_rows_only_for_variants_without_learned_parameters():
    assert approx.random_rows("linformer", {"proj_len": 16}, [64], 2, 8) == []  # learned E, F
    assert approx.random_rows("full", {}, [64], 2, 8) == []  # exact: no row at all
    (row,) = approx.random_rows("local", {"window": 8}, [64], 2, 8)
    assert row["input"] == "random" and row["status"] == "ok" and row["approx_error"] > 0


def test_trained_rows_use_the_trained_module_itself():
    model = Encoder(tiny_config(), "linformer", {"proj_len": 8})
    with torch.no_grad():
        model.attentions[0].E.mul_(0.0).add_(1.0 / 8)  # a trained value a fresh build lacks
    (row,) = approx.trained_rows(model, torch.randint(12, (4, 32)), "linformer", {"proj_len": 8})
    q, k, v = approx.capture_qkv(model, torch.randint(12, (4, 32)))
    fresh = variants.build("linformer", proj_len=8, seq_len=32, num_heads=2, head_dim=8)
    assert row["approx_error"] != pytest.approx(approx.error_of(fresh, q, k, v))


# --- run_task -----------------------------------------------------------------------------------
class Never(variants.Attention):
    def unsupported(self, **case):
        return ["test-only variant that runs nothing"]


class Broken(variants.Attention):
    def attend(self, q, k, v, causal):
        raise RuntimeError("deliberately broken")


@pytest.fixture
def test_variants():
    """Two test-only variants (module level: the worker registers them from the job)."""
    from variants import registry

    variants.register("_test_never")(Never)
    variants.register("_test_broken")(Broken)
    yield ["_test_never", "_test_broken"]
    for name in ("_test_never", "_test_broken"):
        registry._REGISTRY.pop(name, None)


def by_kind(run_dir) -> dict:
    rows = results.ResultsFile(run_dir / "results.csv").rows()
    out: dict = {}
    for r in rows:
        out.setdefault(r["kind"], []).append(r)
    return out


@pytest.mark.slow
def test_run_task_ci_rows_seeds_and_resume(tmp_path, test_variants):
    names = ["full", "local", "xformers", *test_variants]
    cfg = task_config(
        "listops", "ci", f"sweep.variants=[{','.join(names)}]", "sweep.seeds=[0,1]",
        f"results_dir={tmp_path}", "run_id=t", "report=false",
    )  # fmt: skip
    run_dir = run(cfg)
    rows = by_kind(run_dir)
    acc = {(r["variant"], r["seed"]): r for r in rows["accuracy"]}
    assert set(acc) == {(n, s) for n in names for s in "01"}  # exactly the variants it is told
    full = acc[("full", "0")]
    assert full["status"] == "ok" and 0 <= float(full["accuracy"]) <= 1
    assert full["stopped"] in ("target", "patience", "max_steps", "time")
    assert int(full["best_step"]) <= int(full["steps"]) and full["val_accuracy"]
    assert acc[("full", "0")]["accuracy"] != acc[("full", "1")]["accuracy"] or (
        acc[("full", "0")]["train_s"] != acc[("full", "1")]["train_s"]
    )  # two training runs
    assert acc[("xformers", "0")]["status"] == "unsupported"
    assert acc[("_test_never", "0")]["status"] == "unsupported"
    assert acc[("_test_broken", "1")]["status"] == "error"
    assert "deliberately broken" in acc[("_test_broken", "1")]["reason"]
    appr = {(r["variant"], r["input"], r["seed"]) for r in rows["approx"]}
    assert ("local", "trained", "0") in appr and ("local", "trained", "1") in appr
    assert ("local", "random", "0") in appr and not any(v == "full" for v, _, _ in appr)
    assert {r["device"] for r in rows["approx"]} == {"cpu"}  # a report groups rows by machine
    steps = {r["variant"]: r for r in rows["train_step"] if r["status"] == "ok"}
    assert steps["local"]["options"] == acc[("local", "0")]["options"]  # the trained options
    before = (run_dir / "results.csv").read_text()
    run(task_config("listops", "ci", f"results_dir={tmp_path}", "resume=t", "report=false"))
    assert (run_dir / "results.csv").read_text() == before  # a finished run: nothing added


@pytest.mark.slow
def test_the_ci_task_learns(tmp_path):
    """CI must fail when training breaks: on the ci MQAR task full reaches 90% in seconds."""
    cfg = task_config(
        "mqar", "ci", "sweep.variants=[full]", f"results_dir={tmp_path}", "run_id=l",
        "report=false",
    )  # fmt: skip
    (row,) = by_kind(run(cfg))["accuracy"]
    assert row["status"] == "ok", row["reason"]
    assert float(row["accuracy"]) >= 0.9, row  # within the preset's 2000 steps (~30 s idle)
    assert row["stopped"] == "target"


def test_a_task_failure_is_a_row_not_a_crash(tmp_path):
    cfg = task_config(
        "mqar", "ci", "sweep.variants=[full]", "task.timeout_s=0.5", f"results_dir={tmp_path}",
        "run_id=o", "report=false",
    )  # fmt: skip
    (row,) = by_kind(run(cfg))["accuracy"]
    assert row["status"] == "timeout" and "0.5 s" in row["reason"]


@pytest.mark.parametrize("task", TASKS)
def test_baselines(task):
    spec = OmegaConf.to_container(task_config(task, "ci").task)
    m, c = majority_baseline(spec), chance_level(spec)
    assert 0 < c <= m <= 1

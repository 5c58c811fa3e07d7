"""Whole-model training steps (LRA Table 2 protocol): a tiny cell end to end through the sweep,
the optimizer really steps, and the memory columns count what they say."""

from __future__ import annotations

import csv

import pytest
import torch
from hydra import compose, initialize_config_dir

import harness.config as hconfig
from harness import train_step
from harness.sweep import run

TINY_MODEL = {"vocab_size": 17, "num_classes": 3, "d_model": 32, "num_layers": 2,
              "num_heads": 2, "mlp_ratio": 2, "dropout": 0.0, "per_token": False,
              "pad_id": 0}  # fmt: skip


def spec(variant="full", **more) -> dict:
    return {"kind": "train_step", "task": "text", "variant": variant, "options": {},
            "device": "cpu", "dtype": "float32", "batch": 2, "seq_len": 64,
            "model": TINY_MODEL, "threads": 1, "min_run_time": 0.01, "min_blocks": 2,
            "seed": 0} | more  # fmt: skip


def test_the_optimizer_really_steps():
    model, opt, tokens, labels = train_step.build(spec())
    step = train_step.training_step(model, opt, tokens, labels)
    before = [p.detach().clone() for p in model.parameters()]
    step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert all(changed), "every parameter moves after one AdamW step"
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())  # zeroed


def test_state_counts_parameters_gradients_and_both_moments():
    model, opt, tokens, labels = train_step.build(spec())
    train_step.training_step(model, opt, tokens, labels)()
    params = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    # float32 weights, gradients, exp_avg and exp_avg_sq, plus AdamW's scalar step per tensor
    assert train_step.state_bytes(model, opt) == 4 * 4 * params + 4 * tensors


def test_a_training_step_peak_is_what_the_step_adds():
    """The step's peak above its state: at least the activations autograd keeps for backward,
    which for full attention include every layer's n x n attention probabilities."""
    result = train_step.measure_step(spec(seq_len=128))
    assert result["status"] == "ok", result
    layers, heads, batch, n = 2, 2, 2, 128
    probs_mb = layers * batch * heads * n * n * 4 / 2**20
    assert result["peak_mem_mb"] >= probs_mb
    assert result["steps_per_s"] == pytest.approx(1000 / result["latency_ms"])
    assert result["tokens_per_s"] == pytest.approx(result["steps_per_s"] * batch * n)


def test_a_tiny_train_step_sweep_end_to_end(tmp_path):
    model = ",".join(f"sweep.model.{k}={'null' if v is None else v}" for k, v in TINY_MODEL.items())
    with initialize_config_dir(config_dir=str(hconfig.CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "sweep=lra_table2_cpu",
                "sweep.variants=[full,linformer,xformers]",
                "sweep.seq_lens=[64]",
                "sweep.min_run_time=0.01",
                "sweep.min_blocks=2",
                "device.matmul_size=128",
                "report=false",
                f"results_dir={tmp_path}",
                "run_id=t",
                *model.split(","),
            ],
        )
    run_dir = run(cfg)
    with (run_dir / "results.csv").open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"full", "linformer", "xformers"}
    for name in ("full", "linformer"):
        r = rows[name]
        assert r["kind"] == "train_step" and r["status"] == "ok", r["reason"]
        assert float(r["steps_per_s"]) > 0 and float(r["state_mb"]) > 0
        assert r["task"] == "text" and '"d_model": 32' in r["model"]
    assert rows["xformers"]["status"] == "unsupported"

"""Whole-model speed: one training step of the task encoder, Long Range Arena's Table 2 protocol.

Kernel timings overstate what a model gains: embeddings, projections, MLPs, the loss and the
optimizer cost the same for every variant. A ``train_step`` cell times what a user's training
loop pays per step: forward of the encoder (harness/tasks/model.py, its attention built by
``variants.build`` and nothing else), the loss, backward, an AdamW step and ``zero_grad``, on
random tokens of the task's vocabulary at a given length, batch and model size.

Memory: the peak of live tensor bytes during the step, above what exists before it starts.
The parameters, their gradients (kept between steps: ``zero_grad(set_to_none=False)``, as a
fused optimizer keeps them) and AdamW's two moments exist before every step after the first:
they are the step's inputs, counted apart as ``state_mb``, like q, k, v of a kernel cell. The
peak is then the activations, their gradients and the temporaries: what grows with n.

A worker runs the cell (``measure_step``), with the failure rows of every other cell.
"""

from __future__ import annotations

import json

import torch

from . import cell as cells
from .measure import DTYPES, peak_meter, summarize, time_fn


def model_config(spec: dict):
    """The encoder of the cell: the task's vocabulary and head, the given length and size."""
    from .tasks.model import ModelConfig

    model = spec["model"] if isinstance(spec["model"], dict) else json.loads(spec["model"])
    return ModelConfig(seq_len=spec["seq_len"], **model)


def build(spec: dict):
    """(model, optimizer, tokens, labels) on the cell's device, seeded."""
    from .tasks.model import Encoder
    from .tasks.train import TrainConfig, make_optimizer

    torch.manual_seed(spec.get("seed", 0))
    cfg = model_config(spec)
    model = Encoder(cfg, spec["variant"], spec["options"]).to(spec["device"])
    model = model.to(DTYPES[spec["dtype"]]).train()
    g = torch.Generator().manual_seed(spec.get("seed", 0))
    shape = (spec["batch"], cfg.seq_len)
    tokens = torch.randint(cfg.vocab_size, shape, generator=g)
    labels_shape = shape if cfg.per_token else shape[:1]
    labels = torch.randint(cfg.num_classes, labels_shape, generator=g)
    opt = make_optimizer(model, TrainConfig())
    return model, opt, tokens.to(spec["device"]), labels.to(spec["device"])


def training_step(model, opt, tokens, labels):
    """forward, loss, backward, AdamW step, zero_grad: one step of a training loop."""
    from .tasks.train import loss_fn

    def step():
        loss = loss_fn(model(tokens).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: the step's state

    return step


def state_bytes(model, opt) -> int:
    """Parameters, gradients and the optimizer's per-parameter state, in bytes."""
    tensors = [p for p in model.parameters()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_step(spec: dict) -> dict:
    """The worker's job of kind ``train_step``: warm up (the optimizer makes its state), one
    probe step for the memory peak, then time steps."""
    model, opt, tokens, labels = build(spec)
    attn = model.attentions[0]
    reasons = attn.unsupported(
        device=spec["device"], dtype=DTYPES[spec["dtype"]], seq_len=spec["seq_len"]
    )
    reasons += attn.backward_unsupported(device=spec["device"])
    if reasons:
        return {"status": "unsupported", "reason": cells.one_line("; ".join(reasons))}
    step = training_step(model, opt, tokens, labels)
    step()  # warm-up: AdamW allocates its moments; a compiled variant compiles
    cells._sync(spec["device"])
    meter = peak_meter(spec["device"])
    meter.start()
    step()
    cells._sync(spec["device"])
    peak = meter.stop()
    samples = time_fn(
        cells.slowed(step, spec.get("slowdown", 1.0), spec["device"]),
        threads=spec["threads"],
        min_run_time=spec["min_run_time"],
        min_blocks=spec["min_blocks"],
    )
    result = {"status": "ok", "peak_mem_mb": peak / 2**20, "state_mb": state_bytes(model, opt)}
    result["state_mb"] /= 2**20
    result.update(summarize(samples))
    per_s = 1000.0 / result["latency_ms"]
    result.update(steps_per_s=per_s, tokens_per_s=per_s * spec["batch"] * spec["seq_len"])
    return result

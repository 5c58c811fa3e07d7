"""One training run: AdamW, linear warm-up then cosine decay, gradient clipping and accumulation,
validation every ``eval_every`` steps, early stopping on validation accuracy, and test accuracy
from the best validation checkpoint."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .common import IGNORE
from .model import num_params


@dataclass
class TrainConfig:
    batch_size: int = 32  # examples per optimizer step (split into accum_steps micro-batches)
    accum_steps: int = 1  # micro-batches per step: the same step in less memory
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 100
    max_steps: int = 1000  # optimizer steps
    weight_decay: float = 0.1  # on matrices only: decaying norms and biases only hurts
    grad_clip: float = 1.0  # global L2 norm; 0 turns clipping off
    eval_every: int = 100  # steps between validations
    patience: int = 5  # validations without a new best before stopping
    min_steps: int = 0  # no early stop before this: recall tasks sit on a plateau, then jump
    target_accuracy: float | None = None  # stop as soon as validation reaches it (saves budget)
    max_train_s: float | None = None  # wall-clock guard for a CPU budget; None: steps decide
    eval_batch_size: int = 256
    autocast: str | None = None  # "bfloat16": mixed precision on GPU; None: float32 throughout
    seed: int = 0  # initialisation, dropout and batch order

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the attention computes in (what the variant's unsupported() is asked)."""
        return getattr(torch, self.autocast) if self.autocast else torch.float32


def _autocast(cfg: TrainConfig, device):
    """Mixed precision where asked; a no-op context otherwise."""
    return torch.autocast(torch.device(device).type, cfg.dtype, enabled=cfg.autocast is not None)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    done = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def loss_fn(logits, labels):
    """Cross-entropy for both heads: (B, C) vs (B,) or (B, n, C) vs (B, n) with IGNORE."""
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def accuracy(model: nn.Module, data, device, cfg: TrainConfig | None = None) -> float:
    """Fraction of labelled positions (every example, or every MQAR query) predicted right."""
    cfg = cfg or TrainConfig()
    tokens, labels = data
    was_training = model.training
    model.eval()
    right = total = 0
    size = cfg.eval_batch_size
    for i in range(0, len(tokens), size):
        x, y = tokens[i : i + size].to(device), labels[i : i + size].to(device)
        with _autocast(cfg, device):
            pred = model(x).argmax(-1)  # (B,) or (B, n)
        seen = y != IGNORE
        right += int(((pred == y) & seen).sum())
        total += int(seen.sum())
    model.train(was_training)
    return right / max(1, total)


def _batches(n: int, size: int, g: torch.Generator):
    """Endless shuffled index batches, a fresh permutation per epoch."""
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - size + 1, size):
            yield perm[i : i + size]


def _step(model, opt, tokens, labels, idx, cfg: TrainConfig, device) -> float:
    """One optimizer step over ``idx`` split into accum_steps micro-batches; returns the loss."""
    total = 0.0
    for part in idx.chunk(cfg.accum_steps):
        with _autocast(cfg, device):
            logits = model(tokens[part].to(device))
        loss = loss_fn(logits.float(), labels[part].to(device))
        (loss / cfg.accum_steps).backward()
        total += float(loss.detach()) / cfg.accum_steps
    if not math.isfinite(total):
        raise FloatingPointError(f"training loss became {total}")
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def train(model: nn.Module, data: dict, cfg: TrainConfig, device="cpu", ckpt_dir=None) -> dict:
    """Train on data["train"], select on data["val"], report data["test"] accuracy.

    ``data`` maps split -> (tokens, labels). The best state_dict is kept in memory and, with
    ``ckpt_dir``, also written to ``ckpt_dir/best.pt``. Returns accuracy (test), val_accuracy,
    steps, best_step, train_s, params and why training stopped.
    """
    if cfg.batch_size % cfg.accum_steps:
        raise ValueError("batch_size must be a multiple of accum_steps")
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    tokens, labels = data["train"]
    batches = _batches(
        len(tokens), min(cfg.batch_size, len(tokens)), torch.Generator().manual_seed(cfg.seed)
    )
    best = {"acc": -1.0, "step": 0, "state": None}
    stale, stopped, step = 0, "max_steps", 0
    start = time.perf_counter()
    while step < cfg.max_steps:
        _step(model, opt, tokens, labels, next(batches), cfg, device)
        sched.step()
        step += 1
        if step % cfg.eval_every and step != cfg.max_steps:
            continue
        acc = accuracy(model, data["val"], device, cfg)
        if acc > best["acc"]:
            best = {"acc": acc, "step": step, "state": _snapshot(model)}
            stale = 0
        else:
            stale += 1
        stopped = _stop_reason(cfg, step, acc, stale, time.perf_counter() - start)
        if stopped:
            break
    train_s = time.perf_counter() - start
    model.load_state_dict(best["state"])
    if ckpt_dir is not None:
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        torch.save(best["state"], Path(ckpt_dir) / "best.pt")
    return {
        "accuracy": accuracy(model, data["test"], device, cfg),
        "val_accuracy": best["acc"],
        "steps": step,
        "best_step": best["step"],
        "train_s": train_s,
        "params": num_params(model),
        "stopped": stopped or "max_steps",
    }


def _snapshot(model: nn.Module) -> dict:
    """A copy of the weights that later steps cannot change (on CPU, so GPU memory stays free)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _stop_reason(cfg: TrainConfig, step: int, acc: float, stale: int, elapsed: float) -> str:
    if cfg.target_accuracy is not None and acc >= cfg.target_accuracy:
        return "target"
    if stale >= cfg.patience and step >= cfg.min_steps:
        return "patience"
    if cfg.max_train_s is not None and elapsed >= cfg.max_train_s:
        return "time"
    return ""

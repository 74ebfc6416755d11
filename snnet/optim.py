"""Optimiser pieces shared by every trainable snnet module: weight-decay groups and the schedule.

Norms and biases (tensors of one dimension or less) get no weight decay, as in timm and DeiT;
the learning rate warms up linearly, then follows a cosine down to ``min_lr``, stepped per batch.
The floor scales with each group's own learning rate (``min_lr / base lr``), so a group at lr 0
stays at 0 and a group at 0.1x the base lr decays to 0.1x the floor.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float, lr: float | None = None) -> list[dict]:
    """Trainable ``params`` split into a decayed group (matrices, kernels) and an undecayed one
    (norms, biases); empty groups are left out. ``lr`` sets a group learning rate when given."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    extra = {} if lr is None else {"lr": lr}
    groups = [{"params": decay, "weight_decay": weight_decay, **extra}, {"params": no_decay, "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float, base_lr: float | None = None
) -> dict:
    """Linear warmup (from 1e-3 of the lr) then cosine decay to ``min_lr``, as Lightning's per-step
    scheduler config. One multiplicative factor for every group: the floor is ``min_lr / base_lr``
    of each group's lr (``base_lr``: the optimizer's default lr), never an absolute lr."""
    base = optimizer.defaults["lr"] if base_lr is None else base_lr
    if base <= 0 and min_lr > 0:
        raise ValueError(f"base_lr must be positive to scale the floor min_lr={min_lr}, got {base}")
    floor = min_lr / base if min_lr > 0 else 0.0
    total = max(1, int(total_steps))
    warmup = min(warmup_steps, total - 1)
    decay = max(1, total - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return 1e-3 + (1 - 1e-3) * step / warmup
        t = min(step - warmup, decay) / decay
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}


SCHEDULE_KEY = "snnet_schedule"  # where a checkpoint keeps the schedule it was trained under


def schedule_change(saved: dict | None, now: dict) -> str | None:
    """How the learning-rate schedule of a resumed run differs from the one its checkpoint was
    trained under (``total_steps``, ``warmup_steps``, ``min_lr``), or None: a changed ``max_steps``
    or ``max_epochs`` stretches the cosine, so the resumed run is not the one that was started."""
    if not saved:
        return None
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]
    if not changed:
        return None
    return ("resuming with another learning-rate schedule than the checkpoint's (" + ", ".join(changed) +
            "): the rest of the run follows the new schedule from the resumed step, so it differs from an "
            "uninterrupted run of either length")

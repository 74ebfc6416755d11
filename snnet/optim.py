"""Optimiser pieces shared by every trainable snnet module: weight-decay groups and the schedule.

Norms and biases (tensors of one dimension or less) get no weight decay, as in timm and DeiT;
the learning rate warms up linearly, then follows a cosine to ``min_lr``, stepped per batch.
"""
from __future__ import annotations

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


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float) -> dict:
    """Linear warmup (from 1e-3 of the lr) then cosine decay, as Lightning's per-step scheduler config."""
    total = max(1, int(total_steps))
    warmup = min(warmup_steps, total - 1)
    scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, total - warmup), eta_min=min_lr
    )
    if warmup > 0:
        linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, scheduler], milestones=[warmup])
    return {"scheduler": scheduler, "interval": "step"}

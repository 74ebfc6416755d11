"""BatchNorm statistics per path: every configuration normalises with the statistics of its own features.

A BatchNorm layer of an end anchor sees, on a stitched path, the stitching layer's output rather than
its own anchor's features, with other means and variances. Joint training shares one set of running
statistics among every path through a layer, so after training they are an average over whatever
configurations were drawn last: wrong for the stitches and no longer right for the anchors (the
switchable BatchNorm of slimmable networks, Yu et al. 2019, and the post-training calibration of
US-Nets, Yu & Huang 2019, answer the same problem for weight-shared widths).

A :class:`BatchNormBank` holds, for every *slot* (a step of a path: stem, block or head, identified by
the path prefix that leads to it, so paths sharing a prefix share its statistics), running mean and
variance of that step's BatchNorm layers. Calibration re-estimates them on training images with
training-mode (batch-statistics) normalisation, as ``torch.optim.swa_utils.update_bn``
does for one model; afterwards a step whose BatchNorm layers are in eval mode runs with its slot's
statistics swapped in. The layers' own buffers are never written, so training is unaffected.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch import Tensor

BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorms(modules: Sequence[nn.Module], exclude: Sequence[nn.Module] = ()) -> list[BatchNorm]:
    """BatchNorm layers with running statistics in ``modules`` (each once, in ``modules()`` order),
    leaving out those inside ``exclude``."""
    skip = {id(m) for e in exclude for m in e.modules()}
    seen: dict[int, BatchNorm] = {}
    for module in modules:
        for m in module.modules():
            if isinstance(m, BatchNorm) and m.track_running_stats and id(m) not in skip:
                seen.setdefault(id(m), m)
    return list(seen.values())


class BatchNormBank(nn.Module):
    """Running statistics of the BatchNorm layers of every slot, kept as buffers (so checkpointed).

    ``ready[slot]``: whether the slot has been calibrated; an uncalibrated slot runs with the layers'
    own statistics, as if there were no bank.
    """

    def __init__(self) -> None:
        super().__init__()
        self._layers: list[list[BatchNorm]] = []  # not registered: they belong to the anchors
        self.ready: list[bool] = []
        self.calibrating: bool = False
        self._targets: set[int] = set()
        self.register_load_state_dict_post_hook(_sync_ready)

    def add(self, layers: Sequence[BatchNorm]) -> int:
        """A new slot for ``layers``; returns its index. Its statistics are filled in by calibration."""
        slot = len(self._layers)
        self._layers.append(list(layers))
        for i, bn in enumerate(layers):
            self.register_buffer(f"s{slot}_{i}_mean", torch.zeros_like(bn.running_mean))
            self.register_buffer(f"s{slot}_{i}_var", torch.ones_like(bn.running_var))
        self.ready.append(False)
        return slot

    def finish(self) -> None:
        """Call once every slot is added: the calibrated flags become a buffer too."""
        self.register_buffer("calibrated", torch.zeros(len(self._layers), dtype=torch.bool))

    @property
    def num_slots(self) -> int:
        return len(self._layers)

    def _stats(self, slot: int) -> list[tuple[Tensor, Tensor]]:
        return [(getattr(self, f"s{slot}_{i}_mean"), getattr(self, f"s{slot}_{i}_var")) for i in range(len(self._layers[slot]))]

    @contextmanager
    def swapped(self, slot: int) -> Iterator[None]:
        """The slot's layers hold the slot's statistics inside the block (their own ones after)."""
        layers = self._layers[slot]
        own = [(bn.running_mean, bn.running_var) for bn in layers]
        try:
            for bn, (mean, var) in zip(layers, self._stats(slot)):
                bn.running_mean, bn.running_var = mean, var
            yield
        finally:
            for bn, (mean, var) in zip(layers, own):
                bn.running_mean, bn.running_var = mean, var

    def run(self, slot: int, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``fn(x)`` for the step of ``slot``: with the slot's statistics where its layers normalise
        with running statistics (eval mode) and the slot is calibrated, or being calibrated."""
        layers = self._layers[slot]
        if layers[0].training:
            return fn(x)
        if self.calibrating and slot in self._targets:
            with self.swapped(slot):
                for bn in layers:
                    bn.train()
                try:
                    return fn(x)
                finally:
                    for bn in layers:
                        bn.eval()
        if self.ready[slot]:
            with self.swapped(slot):
                return fn(x)
        return fn(x)

    @contextmanager
    def calibration(self, slots: Sequence[int]) -> Iterator[Callable[[int], None]]:
        """Re-estimate ``slots`` over the batches run inside the block; yields ``next_batch(t)``, to call
        before batch ``t`` (0, 1, ...): batch ``t`` enters the running average with weight 1/(t+1), so
        the statistics end as the mean over all batches (as ``momentum=None``). The layers' momenta and
        ``num_batches_tracked`` are restored after."""
        self._targets = set(slots)
        layers = {id(bn): bn for s in slots for bn in self._layers[s]}
        momenta = {i: bn.momentum for i, bn in layers.items()}
        counts = {i: bn.num_batches_tracked.clone() for i, bn in layers.items()}  # training-mode forwards count up

        def next_batch(t: int) -> None:
            for bn in layers.values():
                bn.momentum = 1.0 / (t + 1)

        self.calibrating = True
        try:
            yield next_batch
            for s in slots:
                self.ready[s] = True
                self.calibrated[s] = True
        finally:
            self.calibrating = False
            self._targets = set()
            for i, bn in layers.items():
                bn.momentum = momenta[i]
                bn.num_batches_tracked.copy_(counts[i])


def _sync_ready(bank: BatchNormBank, incompatible_keys: object) -> None:
    """After a state dict is loaded, the Python-side flags follow its ``calibrated`` buffer (read once
    here, so that no forward reads a tensor to decide)."""
    bank.ready = [bool(v) for v in bank.calibrated.tolist()]

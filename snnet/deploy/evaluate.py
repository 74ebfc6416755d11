"""Scoring many stitches on a validation set in one pass over the loader.

The reference SN-Net code scores each configuration with its own full pass over the validation
loader, so every image is read, decoded, transformed and copied once per stitch. Here the loader is
read once; every batch is scored for all stitches with ``StitchableNetwork.forward_many``, which
also computes each shared prefix (stem, front-anchor blocks, stitching layer) once. The naive loop
is kept as ``mode="naive"``: the reference to compare speed and predictions against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from snnet.network import StitchableNetwork
from snnet.figures import stitch_result
from snnet.results import StitchResult

EVAL_MODES: tuple[str, ...] = ("shared", "naive")


@dataclass
class Evaluation:
    """Per-stitch results and, when asked for, each stitch's top-1 class per image (int64, loader order)."""

    results: list[StitchResult]
    predictions: dict[int, Tensor] | None = None


class StitchScores:
    """Top-1/top-5 accuracy per stitch with torchmetrics (the same metric as ``SNNetModule``
    validation, so both report the same numbers); created at the first batch, sized by its logits."""

    def __init__(self, ids: Sequence[int], keep_predictions: bool = False) -> None:
        self.ids = list(ids)
        self.keep_predictions = keep_predictions
        self.acc1: dict[int, MulticlassAccuracy] = {}
        self.acc5: dict[int, MulticlassAccuracy] = {}
        self.predictions: dict[int, list[Tensor]] = {i: [] for i in self.ids}

    def _metrics(self, stitch: int, logits: Tensor) -> tuple[MulticlassAccuracy, MulticlassAccuracy]:
        if stitch not in self.acc1:
            classes = logits.shape[-1]
            self.acc1[stitch] = MulticlassAccuracy(classes, top_k=1, average="micro").to(logits.device)
            self.acc5[stitch] = MulticlassAccuracy(classes, top_k=min(5, classes), average="micro").to(logits.device)
        return self.acc1[stitch], self.acc5[stitch]

    def update(self, stitch: int, logits: Tensor, target: Tensor) -> None:
        if logits.ndim != 2 or logits.shape[0] != target.shape[0]:
            raise ValueError(f"expected logits (B, classes) for targets ({target.shape[0]},), got {tuple(logits.shape)}")
        acc1, acc5 = self._metrics(stitch, logits)
        acc1.update(logits, target)
        acc5.update(logits, target)
        if self.keep_predictions:
            self.predictions[stitch].append(logits.argmax(-1).cpu())

    def accuracies(self) -> dict[int, tuple[float, float]]:
        """Top-1 and top-5 accuracy (%) per stitch id."""
        if not self.acc1:
            raise ValueError("the loader yielded no batches: nothing was scored")
        return {i: (float(self.acc1[i].compute()) * 100, float(self.acc5[i].compute()) * 100) for i in self.ids}

    def evaluation(self, net: StitchableNetwork) -> Evaluation:
        results = []
        for stitch, (acc1, acc5) in self.accuracies().items():
            results.append(stitch_result(net, stitch, acc1, acc5))
        predictions = {i: torch.cat(p) for i, p in self.predictions.items()} if self.keep_predictions else None
        return Evaluation(results, predictions)


def _inputs(batch: Sequence[Tensor], param: Tensor) -> tuple[Tensor, Tensor]:
    x, y = batch[0], batch[1]
    return x.to(param.device, param.dtype, non_blocking=True), y.to(param.device, non_blocking=True)


@torch.inference_mode()
def evaluate_stitches(
    net: StitchableNetwork,
    loader: Iterable[Sequence[Tensor]],
    ids: Sequence[int] | None = None,
    mode: Literal["shared", "naive"] = "shared",
    keep_predictions: bool = False,
    progress: bool = True,
) -> Evaluation:
    """Top-1/top-5 of every stitch in ``ids`` (default: all) over ``(images, labels)`` batches.

    ``shared`` reads each batch once and runs all stitches on it with shared prefixes; ``naive``
    (the reference code's loop) runs one full pass over ``loader`` per stitch. Both run the same
    operations on the same inputs, so they give the same predictions. The network is put in eval
    mode for the call and restored after.
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"unknown evaluation mode {mode!r}; choose one of {EVAL_MODES}")
    ids = list(range(net.num_configs)) if ids is None else [net._check_id(i) for i in ids]
    if not ids:
        raise ValueError("no stitch ids to evaluate")
    param = next(net.parameters())
    scores = StitchScores(ids, keep_predictions)
    was_training = net.training
    net.eval()
    try:
        if mode == "shared":
            for batch in tqdm(loader, desc=f"{len(ids)} stitches", disable=not progress, leave=False):
                x, y = _inputs(batch, param)
                for stitch, logits in net.forward_many(x, ids).items():
                    scores.update(stitch, logits, y)
        else:
            for stitch in tqdm(ids, desc="stitches, one pass each", disable=not progress, leave=False):
                for batch in loader:
                    x, y = _inputs(batch, param)
                    scores.update(stitch, net(x, stitch), y)
    finally:
        net.train(was_training)
    return scores.evaluation(net)

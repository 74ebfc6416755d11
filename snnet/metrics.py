"""Per-stitch classification accuracy accumulated over batches, shared by every method's evaluation
(SN-Net's one-pass evaluation, StitchNet's candidates) so that all report the same numbers."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy


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

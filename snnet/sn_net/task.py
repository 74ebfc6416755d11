"""What SN-Net's LightningModule needs to know about its outputs: the loss, distillation and scores.

Two tasks share the module's training and evaluation loop: image classification (logits (B, K),
labels (B,)) and causal language modelling (logits (B, T, V), next-token targets (B, T)). The task
follows from the anchors (:func:`task_for`): a language-model family is scored by perplexity.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from snnet.sn_net.network import StitchableNetwork


def distillation(logits: Tensor, teacher_logits: Tensor, kind: str, temperature: float) -> Tensor:
    """``hard``: cross-entropy to the teacher's argmax; ``soft``: KL to its softened distribution,
    scaled by ``temperature**2``; averaged over rows (images or tokens) of (N, K) logits."""
    if kind == "hard":
        return F.cross_entropy(logits, teacher_logits.argmax(dim=-1))
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1), reduction="batchmean", log_target=True) * t * t


class ClassScores(nn.Module):
    """Top-1 and top-5 accuracy (%) of one configuration over a validation pass."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")

    def update(self, logits: Tensor, target: Tensor) -> None:
        self.acc1.update(logits, target)
        self.acc5.update(logits, target)

    def compute(self) -> dict[str, float]:
        out = {"acc1": float(self.acc1.compute()) * 100, "acc5": float(self.acc5.compute()) * 100}
        self.acc1.reset()
        self.acc5.reset()
        return out


class TokenScores(Metric):
    """Mean next-token cross-entropy (nats), perplexity and top-1/top-5 next-token accuracy (%),
    summed over tokens (float64) and synchronised across processes."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("nll", "correct1", "correct5", "tokens"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        logits, target = logits.flatten(0, -2), target.flatten()
        self.nll += F.cross_entropy(logits.float(), target, reduction="sum").to(torch.float64)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top == target[:, None]
        self.correct1 += hits[:, 0].sum()
        self.correct5 += hits.any(dim=-1).sum()
        self.tokens += target.numel()

    def compute(self) -> dict[str, float]:
        tokens = float(self.tokens)
        loss = float(self.nll) / tokens
        out = {"loss": loss, "ppl": math.exp(loss), "acc1": float(self.correct1) / tokens * 100, "acc5": float(self.correct5) / tokens * 100}
        self.reset()
        return out


class ClassificationTask:
    """Images to ``num_classes`` logits; scored by top-1 accuracy (higher is better)."""

    metric = "acc1"

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def loss(self, logits: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
        if target.ndim == 2:  # soft targets from mixup/cutmix
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)

    def distill(self, logits: Tensor, teacher_logits: Tensor, kind: str, temperature: float) -> Tensor:
        return distillation(logits, teacher_logits, kind, temperature)

    def scores(self) -> nn.Module:
        return ClassScores(self.num_classes)

    def teacher_logits(self, output: Tensor) -> Tensor:
        return output


class LanguageModelTask:
    """Token ids to next-token logits (B, T, V); every position is a prediction; scored by
    validation perplexity (lower is better)."""

    metric = "ppl"

    def __init__(self, vocab_size: int) -> None:
        self.num_classes = vocab_size

    def loss(self, logits: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
        return F.cross_entropy(logits.flatten(0, -2), target.flatten(), label_smoothing=label_smoothing)

    def distill(self, logits: Tensor, teacher_logits: Tensor, kind: str, temperature: float) -> Tensor:
        return distillation(logits.flatten(0, -2), teacher_logits.flatten(0, -2), kind, temperature)

    def scores(self) -> nn.Module:
        return TokenScores()

    def teacher_logits(self, output) -> Tensor:
        """A transformers model returns an output object: its logits."""
        return output.logits


Task = ClassificationTask | LanguageModelTask


def task_for(net: StitchableNetwork) -> Task:
    """The language-model task for a family of causal LMs (token views), else classification."""
    last = net.anchors[-1]
    if net.is_language_model:
        return LanguageModelTask(int(last.config.vocab_size))
    return ClassificationTask(int(getattr(last, "num_classes")))

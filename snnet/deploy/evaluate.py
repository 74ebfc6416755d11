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
from tqdm.auto import tqdm

from snnet.front import stitch_result
from snnet.metrics import StitchScores
from snnet.results import StitchResult
from snnet.sn_net.network import StitchableNetwork

EVAL_MODES: tuple[str, ...] = ("shared", "naive")


@dataclass
class Evaluation:
    """Per-stitch results and, when asked for, each stitch's top-1 class per image (int64, loader order)."""

    results: list[StitchResult]
    predictions: dict[int, Tensor] | None = None


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
    ids = list(range(net.num_configs)) if ids is None else [net.check_id(i) for i in ids]
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
    results = [stitch_result(net, stitch, acc1, acc5) for stitch, (acc1, acc5) in scores.accuracies().items()]
    predictions = {i: torch.cat(p) for i, p in scores.predictions.items()} if keep_predictions else None
    return Evaluation(results, predictions)

"""Which stitch trains at each step: a pure function of (seed, step), so every DDP rank agrees.

Deriving the sample from the global step (instead of a rank-local RNG, as the reference does)
means all ranks run the same sub-network, no parameter is unused and a resumed run replays the
same sequence.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

SAMPLING: tuple[str, ...] = ("uniform", "flops")


def sampling_weights(flops: Sequence[int], strategy: Literal["uniform", "flops"] = "uniform", groups: int = 10) -> Tensor:
    """Probability of each configuration (float64).

    ``flops`` (SN-Netv2's resource-constrained sampling): configurations are binned into ``groups``
    equal-width FLOPs intervals; a non-empty bin is drawn uniformly, then a member uniformly.
    """
    if strategy not in SAMPLING:
        raise ValueError(f"unknown sampling strategy {strategy!r}; choose one of {SAMPLING}")
    cost = torch.tensor(list(flops), dtype=torch.float64)
    if strategy == "uniform" or len(cost) == 1:
        return torch.full_like(cost, 1.0 / len(cost))
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    span = (cost.max() - cost.min()).clamp_min(1.0)
    bins = ((cost - cost.min()) / span * groups).long().clamp_max(groups - 1)
    sizes = torch.bincount(bins, minlength=groups).to(torch.float64)
    return 1.0 / (sizes[bins] * (sizes > 0).sum())


def with_anchor_share(weights: Tensor, num_anchors: int, share: float) -> Tensor:
    """``weights`` with the anchors (the first ``num_anchors`` configurations) drawn ``share`` of the
    steps, equally, and the stitches the rest in their own proportions.

    Why: uniform sampling gives each anchor one step in ``num_configs``; the stitches' steps then move
    the anchors' shared blocks without the anchors' own loss holding them (their accuracy falls).
    ``share`` 0 trains stitches only (frozen anchors). Unchanged when there are no stitches.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"anchor_share must be in [0, 1], got {share}")
    if len(weights) <= num_anchors:
        return weights
    stitches = weights[num_anchors:]
    return torch.cat([torch.full((num_anchors,), share / num_anchors, dtype=weights.dtype),
                      stitches / stitches.sum() * (1.0 - share)])


def sample_stitch(weights: Tensor, seed: int, step: int) -> int:
    """The configuration for training step ``step``: identical on every rank and after resume."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return int(torch.multinomial(weights, 1, generator=generator))

"""Closed-form least squares for affine maps, accumulated over batches in float64.

Solves ``min_W ||[X 1] W - Y||^2 + ridge ||W||^2`` for many independent maps at once. Only
``[X 1]^T [X 1]`` and ``[X 1]^T Y`` are kept, so memory does not grow with the number of samples.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


def augment(x: Tensor) -> Tensor:
    """[X 1] in float64."""
    x = x.to(torch.float64)
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


class AffineLstsq:
    """Normal equations of ``num_maps`` affine maps of shape in_features -> out_features."""

    def __init__(self, num_maps: int, in_features: int, out_features: int, device: torch.device | str = "cpu") -> None:
        self.gram = torch.zeros(num_maps, in_features + 1, in_features + 1, dtype=torch.float64, device=device)
        self.cross = torch.zeros(num_maps, in_features + 1, out_features, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_maps, dtype=torch.long, device=device)

    def update(self, index: int, x: Tensor, y: Tensor) -> None:
        """Add rows ``x: (n, in)`` with targets ``y: (n, out)`` to map ``index``."""
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"expected x (n, in) and y (n, out) with equal n, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[1] + 1 != self.gram.shape[-1] or y.shape[1] != self.cross.shape[-1]:
            raise ValueError(
                f"map {index} expects {self.gram.shape[-1] - 1} -> {self.cross.shape[-1]} features, "
                f"got {x.shape[1]} -> {y.shape[1]}"
            )
        xa = augment(x)
        self.gram[index] += xa.T @ xa
        self.cross[index] += xa.T @ y.to(torch.float64)
        self.count[index] += x.shape[0]

    def solve(self, ridge: float = 0.0) -> tuple[Tensor, Tensor]:
        """Weights (num_maps, out, in) and biases (num_maps, out), float64.

        Uses the eigendecomposition of the Gram matrix: with ``ridge == 0`` this is the minimum-norm
        (pseudo-inverse) solution, so rank-deficient data gives finite weights (and a warning).
        """
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        if bool((self.count == 0).any()):
            raise ValueError(f"maps {torch.nonzero(self.count == 0).flatten().tolist()} received no data")
        evals, evecs = torch.linalg.eigh(self.gram)
        top = evals[:, -1:].clamp_min(torch.finfo(torch.float64).tiny)
        keep = evals > top * self.gram.shape[-1] * torch.finfo(torch.float64).eps
        if ridge == 0.0 and not bool(keep.all()):
            rank = keep.sum(-1).tolist()
            warnings.warn(
                f"least squares is rank-deficient (rank {rank} of {self.gram.shape[-1]} per map, "
                f"{self.count.tolist()} samples): using the minimum-norm solution; add samples or a ridge",
                stacklevel=2,
            )
        inv = torch.where(keep, 1.0 / (evals + ridge), torch.zeros_like(evals)) if ridge == 0.0 else 1.0 / (evals + ridge)
        solution = evecs @ (inv.unsqueeze(-1) * (evecs.transpose(1, 2) @ self.cross))
        return solution[:, :-1].transpose(1, 2), solution[:, -1]


@dataclass
class StitchInitConfig:
    """Least-squares initialisation of the stitching layers at fit start (never redone on resume)."""

    images: int = 100
    ridge: float = 0.0
    batch_size: int = 50

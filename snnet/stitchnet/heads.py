"""Classifier heads without backpropagation, from a few labelled samples' features.

StitchNet composes the body of a network from pretrained fragments; when the target classes differ
from the pool's, the last fragment's classifier is useless and a new one is fitted in closed form:

* ``ridge`` (default): ridge regression of one-hot targets on the features, bias unpenalised. It
  is the least-squares optimum over every sample's features and accounts for their covariance
  (correlated or noisy feature directions are down-weighted), which class means ignore; with few
  samples the ridge keeps it well-posed (n < feature dim). Its strength is chosen by exact
  leave-one-out error on the same samples (closed form from one SVD), so no validation data and
  no hand-tuned constant are needed.
* ``class_means``: nearest class mean, as a linear layer (``2 mu_c . f - ||mu_c||^2``). Needs no
  solve and no hyper-parameter, but treats every feature direction as equally informative.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from snnet.lstsq import AffineLstsq

HeadKind = Literal["original", "ridge", "class_means"]
HEADS: tuple[str, ...] = ("original", "ridge", "class_means")


def _check(features: Tensor, labels: Tensor, num_classes: int) -> None:
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"expected features (n, d) and labels (n,), got {tuple(features.shape)} and {tuple(labels.shape)}")
    if features.shape[0] == 0:
        raise ValueError("a head needs at least one labelled sample, got 0")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got range {int(labels.min())}..{int(labels.max())}")


def _linear(weight: Tensor, bias: Tensor, like: Tensor) -> nn.Linear:
    head = nn.Linear(weight.shape[1], weight.shape[0], device=like.device, dtype=like.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head.requires_grad_(False)


RIDGE_GRID: tuple[float, ...] = tuple(10.0**e for e in range(-4, 4))  # relative strengths tried by leave-one-out


def _relative(fc: Tensor) -> float:
    """Mean eigenvalue of the centred feature Gram, tr(Fc^T Fc) / d: ridge strengths are relative to it."""
    return max(float(fc.square().sum()) / fc.shape[1], torch.finfo(torch.float64).tiny)


def loo_errors(fc: Tensor, tc: Tensor, ridges: tuple[float, ...] = RIDGE_GRID) -> Tensor:
    """Exact leave-one-out squared error of ridge regression (with its unpenalised intercept) for
    every relative strength in ``ridges``: PRESS = sum_i ||(t_i - t_hat_i) / (1 - h_ii)||^2 with the
    hat matrix H = 11^T/n + U diag(s^2 / (s^2 + lam)) U^T from one SVD of the centred features."""
    n = fc.shape[0]
    u, s, _ = torch.linalg.svd(fc, full_matrices=False)
    proj = u.T @ tc  # (r, k)
    out = []
    for r in ridges:
        shrink = s.square() / (s.square() + r * _relative(fc))
        fitted = u @ (shrink[:, None] * proj)  # centred predictions
        leverage = 1.0 / n + (u.square() * shrink).sum(1)
        out.append((((tc - fitted) / (1.0 - leverage)[:, None]).square()).sum())
    return torch.stack(out)


@torch.no_grad()
def ridge_head(features: Tensor, labels: Tensor, num_classes: int, ridge: float | None = None) -> nn.Linear:
    """argmin_W,b ||F W^T + b - onehot(y)||^2 + lam ||W||^2 with lam = ridge * tr(Fc^T Fc) / d, the
    mean eigenvalue of the centred feature Gram (so ``ridge`` depends neither on the features' scale
    nor on the number of samples); float64 normal equations.

    ``ridge=None`` (default) picks the strength from :data:`RIDGE_GRID` with the lowest exact
    leave-one-out error on these samples (:func:`loo_errors`); with fewer than 3 samples leave-one-out
    is undefined and 1.0 is used. Features and targets are centred first, so the bias is not shrunk;
    ``ridge=0`` gives the minimum-norm least-squares solution (exact recovery of a linear map).
    """
    _check(features, labels, num_classes)
    if ridge is not None and ridge < 0:
        raise ValueError(f"ridge must be >= 0 or None (leave-one-out choice), got {ridge}")
    f64 = features.to(torch.float64)
    targets = torch.nn.functional.one_hot(labels, num_classes).to(torch.float64)
    f_mean, t_mean = f64.mean(0), targets.mean(0)
    fc, tc = f64 - f_mean, targets - t_mean
    if ridge is None:
        ridge = RIDGE_GRID[int(torch.nan_to_num(loo_errors(fc, tc), nan=torch.inf).argmin())] if fc.shape[0] >= 3 else 1.0
    lam = ridge * _relative(fc)
    system = AffineLstsq(1, fc.shape[1], num_classes, device=features.device)
    system.update(0, fc, tc)
    weight, _ = system.solve(ridge=lam)  # centred data: the fitted intercept is exactly 0
    weight = weight[0]
    return _linear(weight, t_mean - weight @ f_mean, features)


@torch.no_grad()
def class_means_head(features: Tensor, labels: Tensor, num_classes: int) -> nn.Linear:
    """Nearest class mean (Euclidean) as a linear layer; every class needs at least one sample."""
    _check(features, labels, num_classes)
    counts = torch.bincount(labels, minlength=num_classes)
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if missing:
        raise ValueError(f"class_means head: classes {missing} have no sample among the {labels.shape[0]} given")
    f64 = features.to(torch.float64)
    sums = torch.zeros(num_classes, f64.shape[1], dtype=torch.float64, device=features.device).index_add_(0, labels, f64)
    means = sums / counts[:, None].to(torch.float64)
    return _linear(2.0 * means, -means.square().sum(1), features)


def fit_head(kind: HeadKind, features: Tensor, labels: Tensor, num_classes: int, ridge: float | None = None) -> nn.Linear:
    if kind == "ridge":
        return ridge_head(features, labels, num_classes, ridge)
    if kind == "class_means":
        return class_means_head(features, labels, num_classes)
    raise ValueError(f"head {kind!r} is not fitted from samples; fitted heads: 'ridge', 'class_means' (all: {HEADS})")

"""StitchNet's bridges: least-squares affine maps from one fragment's output to the activations the
next fragment normally receives, optionally folded into that fragment's first layer."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from snnet.lstsq import AffineLstsq
from snnet.stitching import StitchingLayer, channels_last, from_channels_last
from snnet.stitchnet.fragments import (
    Fragment,
    Steps,
)

Spec = tuple[str, tuple[int, ...], int]  # layout, shape without batch, prefix tokens


def out_spec(f: Fragment) -> Spec:
    return f.out_layout, f.out_shape, f.out_prefix_tokens


def in_spec(f: Fragment) -> Spec:
    return f.in_layout, f.in_shape, f.in_prefix_tokens


def make_bridge(src: Spec, dst: Spec) -> StitchingLayer:
    """An (unfitted) bridge between two activation specs; raises ValueError when none exists."""
    (in_layout, in_shape, in_prefix), (out_layout, out_shape, out_prefix) = src, dst
    return StitchingLayer(in_shape, out_shape, in_layout, out_layout, in_prefix, out_prefix)


def target_rows(x: Tensor, layout: str) -> Tensor:
    """(samples x positions, channels) rows of a fragment's input in its own layout."""
    x = channels_last(x, layout)
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def fit_bridge(bridge: StitchingLayer, source: Tensor, target: Tensor, target_layout: str, ridge: float = 0.0,
               batch_size: int = 64) -> StitchingLayer:
    """Least-squares fit of ``bridge`` mapping ``source`` activations onto ``target`` ones."""
    system = AffineLstsq(1, bridge.in_features, bridge.out_features, device=source.device)
    for src, tgt in zip(source.split(batch_size), target.split(batch_size)):
        system.update(0, bridge.fit_rows(src), target_rows(tgt, target_layout))
    weight, bias = system.solve(ridge)
    bridge.set_affine(weight[0], bias[0])
    return bridge.to(source.dtype)


class FoldedConv(nn.Module):
    """conv(A x + b) as conv'(x) + B: conv' has the weights K A; B = conv(b broadcast over the grid),
    a fixed map, exact at the zero-padded borders too (where conv of a constant is not constant)."""

    def __init__(self, conv: nn.Conv2d, bias_map: Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("bias_map", bias_map)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.bias_map


def _aligned(bridge: StitchingLayer) -> Callable[[Tensor], Tensor]:
    return lambda x: from_channels_last(bridge.align(x), bridge.out_layout)


@torch.no_grad()
def fuse_bridge(bridge: StitchingLayer, fragment: Fragment) -> nn.Module | None:
    """``fragment`` with ``bridge`` folded into its first Conv2d/Linear, or None where it has none
    (blocks of residual nets, output fragments) or the op is grouped."""
    first = fragment.first_op
    weight, bias = bridge.proj.weight.flatten(1), bridge.proj.bias  # (out_b, in_b), (out_b,)
    if isinstance(first, nn.Linear):
        folded: nn.Module = nn.Linear(weight.shape[1], first.out_features, device=weight.device, dtype=weight.dtype)
        folded.weight.copy_(first.weight @ weight)
        folded.bias.copy_(first.weight @ bias + (first.bias if first.bias is not None else 0.0))
    elif isinstance(first, nn.Conv2d) and first.groups == 1:
        conv = nn.Conv2d(weight.shape[1], first.out_channels, first.kernel_size, first.stride, first.padding,
                         first.dilation, bias=False, padding_mode=first.padding_mode, device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(torch.einsum("ockl,ci->oikl", first.weight, weight))
        constant = bias.reshape(1, -1, 1, 1).expand(1, -1, *fragment.in_shape[1:])
        folded = FoldedConv(conv, first(constant)[0])
    else:
        return None
    already_aligned = bridge.in_layout == "vector" or (bridge.direct and bridge.in_layout == "nchw")
    align: list[Callable[[Tensor], Tensor]] = [] if already_aligned else [_aligned(bridge)]
    return Steps([*align, folded, *fragment.rest], [folded, *[m for m in fragment.rest if isinstance(m, nn.Module)]])

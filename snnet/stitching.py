"""Stitching layers: a learned affine map between two anchors' activation spaces.

Linear on tokens and NHWC maps, 1x1 conv on NCHW maps. When layouts or spatial sizes differ,
the input is first brought to the end anchor's grid (token <-> map conversion, bilinear resize);
the same conversion produces the rows that least squares fits, so fit and forward never disagree.

``lora_rank=r`` (SN-Netv2's LoRA stitching layers): the affine weight (from least squares) is
frozen and a low-rank update ``B A / r`` is trained with the bias; ``B`` starts at zero, so the
layer starts as its least-squares map. Training runs the two terms separately; evaluation and
export use the merged affine map, the same function with a plain layer's parameters.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from snnet.families import Layout


def channels_last(x: Tensor, layout: Layout) -> Tensor:
    """(B, ..., C) view of an activation: tokens stay (B, N, C), maps become (B, H, W, C)."""
    return x.permute(0, 2, 3, 1) if layout == "nchw" else x


def from_channels_last(x: Tensor, layout: Layout) -> Tensor:
    return x.permute(0, 3, 1, 2) if layout == "nchw" else x


def spatial_grid(shape: tuple[int, ...], layout: Layout, num_prefix_tokens: int = 0) -> tuple[int, int]:
    """Spatial grid (H, W) of an activation shape given without batch; tokens after the prefix form
    a square grid; a (C,) vector is a 1x1 map."""
    if layout == "vector":
        return 1, 1
    if layout == "nchw":
        return shape[1], shape[2]
    if layout == "nhwc":
        return shape[0], shape[1]
    n = shape[0] - num_prefix_tokens
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"cannot view {n} tokens as a square grid to convert them to a map")
    return side, side


def _source_index(dst: Tensor, in_size: int, out_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Neighbours and weight of output pixel ``dst`` along one axis, exactly as
    ``F.interpolate(mode="bilinear", align_corners=False)`` computes them (clamped at 0)."""
    src = ((dst.to(torch.float32) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0.0)
    low = src.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    return low, high, src - low


def bilinear_at(maps: Tensor, b: Tensor, y: Tensor, x: Tensor, out_grid: tuple[int, int]) -> Tensor:
    """Rows (len(b), C) of ``F.interpolate(maps, out_grid, mode="bilinear")`` at output pixels
    ``(b, y, x)`` of the (B, C, H, W) ``maps``; the same grid gathers without interpolating."""
    (in_h, in_w), (out_h, out_w) = maps.shape[-2:], out_grid
    if (in_h, in_w) == (out_h, out_w):
        return maps[b, :, y, x]
    y0, y1, wy = _source_index(y, in_h, out_h)
    x0, x1, wx = _source_index(x, in_w, out_w)
    wy, wx = wy.to(maps.dtype)[:, None], wx.to(maps.dtype)[:, None]
    top = maps[b, :, y0, x0] * (1 - wx) + maps[b, :, y0, x1] * wx
    bottom = maps[b, :, y1, x0] * (1 - wx) + maps[b, :, y1, x1] * wx
    return top * (1 - wy) + bottom * wy


class StitchingLayer(nn.Module):
    """Maps a front anchor's block output onto the end anchor's block input.

    Shapes are given without the batch dimension, in each side's own layout.
    """

    def __init__(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        in_layout: Layout,
        out_layout: Layout,
        in_prefix_tokens: int = 0,
        out_prefix_tokens: int = 0,
        lora_rank: int = 0,
    ) -> None:
        super().__init__()
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0: a plain stitching layer), got {lora_rank}")
        self.shape_args = (tuple(in_shape), tuple(out_shape), in_layout, out_layout, in_prefix_tokens, out_prefix_tokens)
        if (in_layout == "vector") != (out_layout == "vector"):
            raise ValueError(
                f"cannot stitch a {in_layout} activation {in_shape} to a {out_layout} one {out_shape}: vectors "
                "(B, C) have no spatial grid; only vector -> vector or between tokens/nchw/nhwc maps"
            )
        self.in_layout, self.out_layout = in_layout, out_layout
        self.in_features = in_shape[0] if in_layout == "nchw" else in_shape[-1]
        self.out_features = out_shape[0] if out_layout == "nchw" else out_shape[-1]
        self.in_prefix_tokens = in_prefix_tokens
        same_tokens = in_layout == out_layout == "tokens" and in_shape[0] == out_shape[0]
        same_map = in_layout == out_layout in ("nchw", "nhwc") and spatial_grid(in_shape, in_layout, 0) == spatial_grid(out_shape, out_layout, 0)
        self.direct = same_tokens or same_map or in_layout == "vector"
        if not self.direct:
            if out_layout == "tokens" and out_prefix_tokens:
                raise ValueError(
                    f"stitching into tokens with {out_prefix_tokens} prefix (class) token(s) from a {in_layout} "
                    "activation is not supported: the end anchor's class token has no source"
                )
            self.in_grid = spatial_grid(in_shape, in_layout, in_prefix_tokens)
            self.out_grid = spatial_grid(out_shape, out_layout, out_prefix_tokens)
        if in_layout == out_layout == "nchw":
            self.proj: nn.Module = nn.Conv2d(self.in_features, self.out_features, kernel_size=1)
        else:
            self.proj = nn.Linear(self.in_features, self.out_features)
        self.lora_rank = lora_rank
        if lora_rank:
            self.proj.weight.requires_grad_(False)
            # as the reference (loralib): A as nn.Linear's default init, B zero, scale alpha / r with alpha 1
            self.lora_a = nn.Parameter(torch.empty(lora_rank, self.in_features))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
            self.lora_b = nn.Parameter(torch.zeros(self.out_features, lora_rank))

    def extra_repr(self) -> str:
        lora = f", lora_rank={self.lora_rank}" if self.lora_rank else ""
        return f"{self.in_layout} -> {self.out_layout}, direct={self.direct}{lora}"

    def affine_weight(self) -> Tensor:
        """The (out x in) weight of the affine map this layer computes, LoRA update merged in."""
        weight = self.proj.weight.flatten(1)
        if self.lora_rank:
            weight = weight + (self.lora_b @ self.lora_a) / self.lora_rank
        return weight

    def merged(self) -> "StitchingLayer":
        """This layer as a plain one (no LoRA): itself when plain, else a new layer holding the
        merged affine map (what export writes and what FLOPs and parameters are counted on)."""
        if not self.lora_rank:
            return self
        param = self.proj.weight
        plain = StitchingLayer(*self.shape_args).to(device=param.device, dtype=param.dtype)
        plain.set_affine(self.affine_weight().detach(), self.proj.bias.detach())
        return plain.train(self.training)

    def align(self, x: Tensor) -> Tensor:
        """Bring ``x`` onto the end anchor's grid, channels last: (B, N, C) or (B, H, W, C)."""
        if self.direct:
            return channels_last(x, self.in_layout)
        if self.in_layout == "tokens":
            x = x[:, self.in_prefix_tokens:].unflatten(1, self.in_grid)
        else:
            x = channels_last(x, self.in_layout)
        if self.in_grid != self.out_grid:
            x = F.interpolate(x.permute(0, 3, 1, 2), size=self.out_grid, mode="bilinear", align_corners=False)
            x = x.permute(0, 2, 3, 1)
        return x.flatten(1, 2) if self.out_layout == "tokens" else x

    def fit_rows(self, x: Tensor) -> Tensor:
        """Input rows (samples x in_features) that the affine map sees, for least squares."""
        return self.align(x).reshape(-1, self.in_features)

    def fit_rows_at(self, x: Tensor, rows: Tensor) -> Tensor:
        """``fit_rows(x)[rows]`` without aligning the whole batch: only the requested rows are
        gathered (and bilinearly interpolated where the grids differ), so a random subset of rows,
        as CKA uses, costs the subset and not a full resize of every map. ``rows``: int64 indices."""
        if self.direct and self.in_layout != "nchw":
            return x.reshape(-1, self.in_features)[rows]
        if self.direct:  # nchw, same grid: row b * H * W + p is x[b, :, p]
            return x.flatten(2)[rows // x[0, 0].numel(), :, rows % x[0, 0].numel()]
        if self.in_layout == "tokens":
            x = x[:, self.in_prefix_tokens:].unflatten(1, self.in_grid)
        maps = x if self.in_layout == "nchw" else x.permute(0, 3, 1, 2)  # (B, C, H, W), a view
        out_h, out_w = self.out_grid
        b, pos = rows // (out_h * out_w), rows % (out_h * out_w)
        return bilinear_at(maps, b, pos // out_w, pos % out_w, self.out_grid)

    def set_affine(self, weight: Tensor, bias: Tensor) -> None:
        """Load ``y = x @ weight.T + bias`` (weight: out x in)."""
        with torch.no_grad():
            self.proj.weight.copy_(weight.reshape(self.proj.weight.shape))
            self.proj.bias.copy_(bias)
            if self.lora_rank:
                self.lora_b.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if self.lora_rank and not self.training:
            weight = self.affine_weight()
            if self.direct and self.in_layout == "nchw":
                return F.conv2d(x, weight[:, :, None, None], self.proj.bias)
            return from_channels_last(F.linear(self.align(x), weight, self.proj.bias), self.out_layout)
        if self.direct and self.in_layout == "nchw":
            y = self.proj(x)
            if self.lora_rank:
                update = F.conv2d(F.conv2d(x, self.lora_a[:, :, None, None]), self.lora_b[:, :, None, None])
                y = y + update / self.lora_rank
            return y
        x = self.align(x)
        y = F.linear(x, self.proj.weight.flatten(1), self.proj.bias)
        if self.lora_rank:
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b) / self.lora_rank
        return from_channels_last(y, self.out_layout)

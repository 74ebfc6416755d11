"""Adapters for general stitching: any block output of a sender into any block input of a receiver.

Bansal et al. (2021) stitch with a 1x1 convolution between BatchNorms; Traft & Cheney show that
layers far apart need more (a ResNet bottleneck) and a spatial rescale (bilinear before the
adapter, or a stride-2 convolution inside it). One :class:`Adapter` covers all of these:

    sender layout -> map (B, C, H, W) [-> bilinear to the receiver grid] -> BN? -> core -> BN? -> receiver layout

The core comes from the :data:`ADAPTERS` registry and only ever sees channels-first maps.
Layout rules (those of :class:`~snnet.stitching.StitchingLayer`, plus one for class tokens):

* tokens -> tokens with the same count and prefix (class) tokens, pointwise core: every token,
  class token included, goes through the core as a (N, 1) "map" (the StitchingLayer's direct case);
* otherwise tokens are viewed as their patch grid and the sender's prefix tokens are dropped;
* into tokens with prefix tokens from a grid, each prefix token is the *mean of the adapter's
  output patch tokens* (the receiver's class token has no source; the mean is the one
  position-free summary, like global average pooling);
* a ``vector`` (B, C) activation is a 1x1 map; into a vector, a map is averaged over positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from snnet.families import LAYOUTS, Layout
from snnet.lstsq import AffineLstsq
from snnet.stitching import spatial_grid

Rescale = Literal["bilinear", "stride2", "none"]
RESCALES: tuple[str, ...] = ("bilinear", "stride2", "none")
AdapterBuilder = Callable[..., nn.Module]  # (in_channels, out_channels, stride, **kwargs) -> module on NCHW maps
ADAPTERS: dict[str, AdapterBuilder] = {}


def register_adapter(name: str) -> Callable[[AdapterBuilder], AdapterBuilder]:
    """Register ``builder(in_channels, out_channels, stride, **kwargs)`` under ``name``."""

    def wrap(builder: AdapterBuilder) -> AdapterBuilder:
        ADAPTERS[name] = builder
        return builder

    return wrap


class PointwiseMap(nn.Module):
    """1x1 convolution (a linear map per position), optionally followed by ReLU.

    With stride 2 it reads every other position, which is what a strided 1x1 convolution does.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, relu: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride)
        self.relu = relu

    def linear_path(self) -> tuple[nn.Conv2d, nn.Module]:
        """The 1x1 conv that least squares fits, and the BN after it (none here)."""
        return self.proj, nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(x)
        return F.relu(y) if self.relu else y


class Bottleneck(nn.Module):
    """ResNet bottleneck (He et al. 2016): 1x1 reduce, 3x3 (carries the stride), 1x1 expand, each
    with BatchNorm, plus a 1x1 projection shortcut with BatchNorm, ReLU after the sum.

    ``width`` defaults to ``out_channels // 4`` (ResNet's expansion 4). The last BN starts at zero
    (zero-init residual), so the adapter starts as the ReLU of its projection shortcut; least squares
    can fit that shortcut, so a bottleneck starts where ``linear_relu`` does and adds a nonlinear
    residual on top.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, width: int | None = None) -> None:
        super().__init__()
        width = width or max(out_channels // 4, 1)
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )
        nn.init.zeros_(self.branch[-1].weight)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))

    def linear_path(self) -> tuple[nn.Conv2d, nn.Module]:
        return self.shortcut[0], self.shortcut[1]

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


@register_adapter("linear")
def linear(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    return PointwiseMap(in_channels, out_channels, stride)


@register_adapter("linear_relu")
def linear_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    return PointwiseMap(in_channels, out_channels, stride, relu=True)


@register_adapter("conv3x3_relu")
def conv3x3_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1), nn.ReLU())


@register_adapter("bottleneck")
def bottleneck(in_channels: int, out_channels: int, stride: int = 1, width: int | None = None) -> nn.Module:
    return Bottleneck(in_channels, out_channels, stride, width)


@dataclass
class AdapterConfig:
    """Which adapter and how it is wrapped (YAML-friendly; ``kwargs`` go to the builder, e.g. ``width``)."""

    name: str = "linear"
    bn_before: bool = False
    bn_after: bool = False
    rescale: Rescale = "bilinear"
    kwargs: dict[str, Any] = field(default_factory=dict)


def check_adapter_name(name: str) -> None:
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; choose one of {sorted(ADAPTERS)}")


def _check_shape(shape: tuple[int, ...], layout: str, side: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown {side} layout {layout!r}; choose one of {LAYOUTS}")
    want = {"tokens": 2, "vector": 1}.get(layout, 3)
    if len(shape) != want:
        raise ValueError(f"{side} shape {tuple(shape)} does not fit layout {layout!r}: expected {want} dims without batch")


def _channels(shape: tuple[int, ...], layout: Layout) -> int:
    return shape[0] if layout == "nchw" else shape[-1]


class Adapter(nn.Module):
    """Layout conversion, spatial rescale, optional BatchNorms and a registered core; see module doc.

    Shapes are given without batch, each in its own layout. Build with :func:`create_adapter`.
    """

    def __init__(
        self,
        name: str,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        in_layout: Layout,
        out_layout: Layout,
        bn_before: bool = False,
        bn_after: bool = False,
        rescale: Rescale = "bilinear",
        in_prefix_tokens: int = 0,
        out_prefix_tokens: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        check_adapter_name(name)
        if rescale not in RESCALES:
            raise ValueError(f"unknown rescale {rescale!r}; choose one of {RESCALES}")
        _check_shape(in_shape, in_layout, "sender")
        _check_shape(out_shape, out_layout, "receiver")
        self.name, self.rescale = name, rescale
        self.in_layout, self.out_layout = in_layout, out_layout
        self.in_channels, self.out_channels = _channels(in_shape, in_layout), _channels(out_shape, out_layout)
        same_tokens = (
            in_layout == out_layout == "tokens" and in_shape[0] == out_shape[0] and in_prefix_tokens == out_prefix_tokens
        )
        self.drop_prefix = in_prefix_tokens if in_layout == "tokens" else 0
        self.make_prefix = out_prefix_tokens if out_layout == "tokens" else 0
        self.stride = 1 if same_tokens or out_layout == "vector" else self._stride(
            spatial_grid(in_shape, in_layout, in_prefix_tokens), spatial_grid(out_shape, out_layout, out_prefix_tokens))
        self.core = ADAPTERS[name](self.in_channels, self.out_channels, self.stride, **kwargs)
        if same_tokens and isinstance(self.core, PointwiseMap):  # every token (class token included) is one position of an (N, 1) map
            self.in_grid = self.out_grid = (in_shape[0], 1)
            self.drop_prefix = self.make_prefix = 0
        else:
            self.in_grid = spatial_grid(in_shape, in_layout, in_prefix_tokens)
            self.out_grid = spatial_grid(out_shape, out_layout, out_prefix_tokens)
        self.bn_before = nn.BatchNorm2d(self.in_channels) if bn_before else nn.Identity()
        self.bn_after = nn.BatchNorm2d(self.out_channels) if bn_after else nn.Identity()

    def _stride(self, in_grid: tuple[int, int], out_grid: tuple[int, int]) -> int:
        if self.rescale != "stride2" or in_grid == out_grid:
            return 1
        if in_grid == (2 * out_grid[0], 2 * out_grid[1]):
            return 2
        raise ValueError(
            f"rescale='stride2' needs the sender grid {in_grid} to be exactly twice the receiver grid "
            f"{out_grid} (or equal); use rescale='bilinear' for other ratios"
        )

    def extra_repr(self) -> str:
        return (f"{self.name}: {self.in_layout}{self.in_grid}x{self.in_channels} -> {self.out_layout}{self.out_grid}"
                f"x{self.out_channels}, rescale={self.rescale}, stride={self.stride}")

    @property
    def lstsq_ready(self) -> bool:
        """Whether the core has a linear path (a 1x1 conv) that least squares can fit."""
        return hasattr(self.core, "linear_path")

    # --- layout conversion ----------------------------------------------------------------
    def _as_map(self, x: Tensor, layout: Layout, grid: tuple[int, int], drop_prefix: int) -> Tensor:
        if layout == "nchw":
            return x
        if layout == "nhwc":
            return x.permute(0, 3, 1, 2)
        if layout == "vector":
            return x[:, :, None, None]
        return x[:, drop_prefix:].unflatten(1, grid).permute(0, 3, 1, 2)

    def to_map(self, x: Tensor) -> Tensor:
        """Sender activation -> (B, C_in, H, W) on the grid the core reads (bilinear rescale applied)."""
        m = self._as_map(x, self.in_layout, self.in_grid, self.drop_prefix)
        if self.out_layout == "vector":  # a vector receiver reads the spatial mean, as a global-pool head does
            return m.mean(dim=(2, 3), keepdim=True)
        if self.rescale == "bilinear" and tuple(m.shape[-2:]) != self.out_grid:
            m = F.interpolate(m, size=self.out_grid, mode="bilinear", align_corners=False)
        return m

    def target_map(self, y: Tensor) -> Tensor:
        """Receiver activation -> (B, C_out, H, W) as the core should produce it (prefix tokens dropped)."""
        return self._as_map(y, self.out_layout, self.out_grid, self.make_prefix)

    def from_map(self, m: Tensor) -> Tensor:
        if self.out_layout == "nchw":
            return m
        if self.out_layout == "nhwc":
            return m.permute(0, 2, 3, 1)
        if self.out_layout == "vector":
            return m.flatten(1)
        tokens = m.flatten(2).transpose(1, 2)
        if self.make_prefix:
            prefix = tokens.mean(dim=1, keepdim=True).expand(-1, self.make_prefix, -1)
            tokens = torch.cat([prefix, tokens], dim=1)
        return tokens

    def forward(self, x: Tensor) -> Tensor:
        return self.from_map(self.bn_after(self.core(self.bn_before(self.to_map(x)))))


def create_adapter(
    name: str, in_shape: Sequence[int], out_shape: Sequence[int], in_layout: Layout, out_layout: Layout, **options: Any
) -> Adapter:
    """An :class:`Adapter` around the registered core ``name``; ``options`` are :class:`Adapter`'s
    keyword arguments (``bn_before``, ``bn_after``, ``rescale``, prefix tokens) and the core builder's."""
    return Adapter(name, tuple(in_shape), tuple(out_shape), in_layout, out_layout, **options)


def _rows(m: Tensor) -> Tensor:
    """(B, C, H, W) -> (B*H*W, C)."""
    return m.permute(0, 2, 3, 1).reshape(-1, m.shape[1])


def _calibrate_bn(bn: nn.Module, m: Tensor, shift: Tensor | None = None) -> None:
    """Give BN ``m``'s per-channel statistics. Without ``shift`` it standardises (weight 1, bias 0);
    with ``shift`` its eval-mode output is ``m + shift`` (it passes a fitted map through unchanged).
    In train mode batch statistics replace these, and match them on data like ``m``."""
    if not isinstance(bn, nn.BatchNorm2d):
        if shift is not None and bool(shift.any()):
            raise ValueError("a bias-free linear path needs a BatchNorm after it to carry the fitted bias")
        return
    rows = _rows(m).to(torch.float64)
    mean, var = rows.mean(dim=0), rows.var(dim=0, unbiased=False)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    bn.weight.copy_(torch.ones_like(var) if shift is None else (var + bn.eps).sqrt())
    bn.bias.copy_(torch.zeros_like(mean) if shift is None else mean + shift)


@torch.no_grad()
def init_lstsq(adapter: Adapter, x: Tensor, y: Tensor, ridge: float = 0.0) -> None:
    """Fit the adapter's linear path so that, in eval mode, ``adapter(x) ~= y`` by least squares.

    ``x``: sender activations, ``y``: receiver activations (batched, each in its own layout).
    The linear path is the 1x1 conv of ``linear``/``linear_relu``, or the projection shortcut of
    ``bottleneck`` (whose residual branch starts at zero, so the whole adapter starts at the fit;
    ReLUs after the fit are kept). The fit goes *through* the BatchNorms: BN-before gets the
    data's statistics (it standardises, as in training), the map is solved in float64 on the
    standardised rows, and BNs after it get statistics and affine weights that pass the fitted
    output through unchanged. The eval-mode adapter then is the least-squares map (up to those
    ReLUs); train-mode batch statistics match on data like the calibration data.
    """
    if not adapter.lstsq_ready:
        ready = [name for name in ADAPTERS if hasattr(ADAPTERS[name](1, 1, 1), "linear_path")]
        raise ValueError(f"least-squares init needs an adapter with a linear path {ready}, not {adapter.name!r}")
    conv, conv_bn = adapter.core.linear_path()
    was_training = adapter.training
    adapter.eval()
    try:
        m = adapter.to_map(x)
        _calibrate_bn(adapter.bn_before, m)
        z = adapter.bn_before(m)
        target = adapter.target_map(y)
        stride = conv.stride[0]
        rows = z[:, :, ::stride, ::stride]
        if rows.shape[0] != target.shape[0] or rows.shape[2:] != target.shape[2:]:
            raise ValueError(
                f"least squares needs sender and receiver maps on one grid: adapter input gives "
                f"{tuple(rows.shape)}, receiver target is {tuple(target.shape)} (rescale={adapter.rescale!r})"
            )
        solver = AffineLstsq(1, adapter.in_channels, adapter.out_channels, device=z.device)
        solver.update(0, _rows(rows), _rows(target))
        weight, bias = solver.solve(ridge)
        conv.weight.copy_(weight[0].reshape(conv.weight.shape))
        if conv.bias is not None:
            conv.bias.copy_(bias[0])
            _calibrate_bn(conv_bn, conv(z), torch.zeros_like(bias[0]))
        else:
            _calibrate_bn(conv_bn, conv(z), bias[0])
        _calibrate_bn(adapter.bn_after, adapter.core(z), torch.zeros(adapter.out_channels, dtype=torch.float64, device=z.device))
    finally:
        adapter.train(was_training)

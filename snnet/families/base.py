"""The block view every method consumes, and the registry that finds it for a model.

SN-Net needs every anchor as ``stem -> blocks -> head``. Any model is split by the generic
splitter (:mod:`snnet.families.generic`); a family may instead register a hand adapter, which
takes priority for its classes. Everything else in snnet works on views only.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn as nn
from torch import Tensor

Layout = Literal["tokens", "nchw", "nhwc", "vector"]  # vector: (B, C), e.g. after flatten in a plain net
LAYOUTS: tuple[str, ...] = ("tokens", "nchw", "nhwc", "vector")


@dataclass
class AnchorView:
    """An anchor split into stem, ordered blocks and head (final norm included).

    ``stem(x)`` then every block in order then ``head(x)`` must equal ``model(x)``.
    Activations are read at *points*: point 0 is the stem's output, point ``p`` block ``p - 1``'s.
    ``layout`` / ``num_prefix_tokens`` hold at every point unless ``point_layouts`` /
    ``point_prefix_tokens`` (one entry per point) say otherwise: a plain net's classifier blocks
    after a flatten carry vectors after NCHW feature blocks. Read them with :meth:`layout_at`.
    ``input_dtype``/``input_size``: the probe input's dtype (None: the model's parameters', e.g.
    int64 token ids for a language model) and default size without batch (None: the model's own);
    ``per_token``: FLOPs are reported per token of the probe sequence (input_size[0]), not per sample.
    ``stem_modules``: the modules the stem owns, where it shares a tensor with the head (a language
    model's embedding tied to its output layer); None: whatever is in neither blocks nor head.
    """

    model: nn.Module
    stem: Callable[[Tensor], Tensor]
    blocks: list[nn.Module]
    head: Callable[[Tensor], Tensor]
    head_modules: list[nn.Module]  # modules owned by the head, for parameter accounting
    block_stages: list[int]
    layout: Layout  # layout of every block's output
    stitch_stages: tuple[int, ...]  # stages in which SN-Net may stitch (family default)
    isotropic: bool  # one stage of equal blocks (ViT): windows also pair j >= k
    num_prefix_tokens: int = 0
    point_layouts: list[Layout] | None = None
    point_prefix_tokens: list[int] | None = None
    input_dtype: torch.dtype | None = None
    input_size: tuple[int, ...] | None = None
    per_token: bool = False
    stem_modules: list[nn.Module] | None = None

    def __post_init__(self) -> None:
        points = len(self.blocks) + 1
        if self.point_layouts is None:
            self.point_layouts = [self.layout] * points
        if self.point_prefix_tokens is None:
            self.point_prefix_tokens = [self.num_prefix_tokens if lay == "tokens" else 0 for lay in self.point_layouts]
        if not len(self.point_layouts) == len(self.point_prefix_tokens) == points:
            raise ValueError(
                f"point_layouts ({len(self.point_layouts)}) and point_prefix_tokens ({len(self.point_prefix_tokens)}) "
                f"need one entry per point: the stem output and each of the {len(self.blocks)} blocks' outputs"
            )
        bad = [lay for lay in self.point_layouts if lay not in LAYOUTS]
        if bad:
            raise ValueError(f"unknown layouts {bad}; choose from {LAYOUTS}")

    def layout_at(self, point: int) -> tuple[Layout, int]:
        """(layout, prefix tokens) of the activation at ``point`` (0: stem output, p: block p - 1's)."""
        return self.point_layouts[point], self.point_prefix_tokens[point]

    @property
    def stage_depths(self) -> tuple[int, ...]:
        return tuple(self.block_stages.count(s) for s in range(max(self.block_stages) + 1))


_FAMILIES: dict[type, Callable[[nn.Module], AnchorView]] = {}
# adapters of classes from heavy libraries, imported when a model of that library first asks:
# module-name prefix of the model's class -> the snnet module that registers its adapters
_LAZY_ADAPTERS: dict[str, str] = {"transformers.": "snnet.families.lm"}


def register_family(*model_classes: type) -> Callable:
    """Register an adapter ``fn(model) -> AnchorView`` for one or more model classes."""

    def wrap(fn: Callable[[nn.Module], AnchorView]) -> Callable[[nn.Module], AnchorView]:
        for cls in model_classes:
            _FAMILIES[cls] = fn
        return fn

    return wrap


def supported_families() -> list[str]:
    return sorted(cls.__name__ for cls in _FAMILIES)


def registered_adapter(model: nn.Module) -> Callable[[nn.Module], AnchorView] | None:
    """The hand adapter registered for ``model``'s class or a base class, if any."""
    for prefix, module in _LAZY_ADAPTERS.items():
        if type(model).__module__.startswith(prefix):
            importlib.import_module(module)  # registers on first import; later calls are a dict lookup
    return next((_FAMILIES[cls] for cls in type(model).__mro__ if cls in _FAMILIES), None)


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The size the model was built for: a fixed patch-embedding size wins over the pretrained config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    patch_embed = getattr(model, "patch_embed", None)
    if getattr(patch_embed, "img_size", None) is not None:  # proj may be a Sequential (XCiT): channels from the config
        channels = getattr(getattr(patch_embed, "proj", None), "in_channels", None) or cfg.get("input_size", (3,))[0]
        return (channels, *patch_embed.img_size)
    if "input_size" not in cfg:
        raise ValueError(f"{type(model).__name__} has no pretrained_cfg['input_size']; pass input_size explicitly")
    return tuple(cfg["input_size"])

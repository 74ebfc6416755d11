"""Block views of model families: the one place that knows how a family is built.

SN-Net needs every anchor as ``stem -> blocks -> head``. Instead of copying the method per
family (as the reference code does), each family registers a small adapter that returns an
:class:`AnchorView`; everything else in snnet works on views only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

Layout = Literal["tokens", "nchw", "nhwc", "vector"]  # vector: (B, C), e.g. after flatten in a plain net
LAYOUTS: tuple[str, ...] = ("tokens", "nchw", "nhwc", "vector")


@dataclass
class AnchorView:
    """An anchor split into stem, ordered blocks and head (final norm included).

    ``stem(x)`` then every block in order then ``head(x)`` must equal ``model(x)``.
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

    @property
    def stage_depths(self) -> tuple[int, ...]:
        return tuple(self.block_stages.count(s) for s in range(max(self.block_stages) + 1))


_FAMILIES: dict[type, Callable[[nn.Module], AnchorView]] = {}


def register_family(*model_classes: type) -> Callable:
    """Register an adapter ``fn(model) -> AnchorView`` for one or more model classes."""

    def wrap(fn: Callable[[nn.Module], AnchorView]) -> Callable[[nn.Module], AnchorView]:
        for cls in model_classes:
            _FAMILIES[cls] = fn
        return fn

    return wrap


def supported_families() -> list[str]:
    return sorted(cls.__name__ for cls in _FAMILIES)


def anchor_view(model: nn.Module) -> AnchorView:
    """The block view of ``model``, found by its class (or a base class) in the registry."""
    for cls in type(model).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls](model)
    raise TypeError(
        f"no snnet family adapter for {type(model).__name__}; supported: {', '.join(supported_families())}. "
        "Register one with snnet.families.register_family."
    )


def _staged(stages: list[list[nn.Module]]) -> tuple[list[nn.Module], list[int]]:
    blocks = [b for stage in stages for b in stage]
    block_stages = [s for s, stage in enumerate(stages) for _ in stage]
    return blocks, block_stages


def _all_but_last(n_stages: int) -> tuple[int, ...]:
    return tuple(range(n_stages - 1))


# --- timm families -----------------------------------------------------------------------
def _register_timm_families() -> None:
    from timm.models.resnet import ResNet
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    @register_family(VisionTransformer)
    def vit_view(m: VisionTransformer) -> AnchorView:
        def stem(x: Tensor) -> Tensor:
            return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

        blocks = list(m.blocks)
        head_modules = [m.norm, m.fc_norm, m.head] + ([m.attn_pool] if getattr(m, "attn_pool", None) else [])
        return AnchorView(
            model=m, stem=stem, blocks=blocks, head=lambda x: m.forward_head(m.norm(x)),
            head_modules=head_modules, block_stages=[0] * len(blocks), layout="tokens",
            stitch_stages=(0,), isotropic=True, num_prefix_tokens=m.num_prefix_tokens,
        )

    @register_family(SwinTransformer)
    def swin_view(m: SwinTransformer) -> AnchorView:
        # timm puts PatchMerging at the start of each stage: it belongs to that stage's first block.
        stages = [
            [nn.Sequential(stage.downsample, stage.blocks[0]) if i == 0 else blk for i, blk in enumerate(stage.blocks)]
            for stage in m.layers
        ]
        blocks, block_stages = _staged(stages)
        return AnchorView(
            model=m, stem=m.patch_embed, blocks=blocks, head=lambda x: m.forward_head(m.norm(x)),
            head_modules=[m.norm, m.head], block_stages=block_stages, layout="nhwc",
            stitch_stages=_all_but_last(len(stages)), isotropic=False,
        )

    @register_family(ResNet)
    def resnet_view(m: ResNet) -> AnchorView:
        def stem(x: Tensor) -> Tensor:
            return m.maxpool(m.act1(m.bn1(m.conv1(x))))

        blocks, block_stages = _staged([list(m.layer1), list(m.layer2), list(m.layer3), list(m.layer4)])
        # SN-Net stitches ResNets in the two middle stages only (reference ResNet code).
        return AnchorView(
            model=m, stem=stem, blocks=blocks, head=m.forward_head, head_modules=[m.fc],
            block_stages=block_stages, layout="nchw", stitch_stages=(1, 2), isotropic=False,
        )


def _register_cifar_family() -> None:
    from snnet.models.cifar_resnet import CifarResNet

    @register_family(CifarResNet)
    def cifar_resnet_view(m: CifarResNet) -> AnchorView:
        def stem(x: Tensor) -> Tensor:
            return F.relu(m.bn1(m.conv1(x)))

        blocks, block_stages = _staged([list(m.layer1), list(m.layer2), list(m.layer3)])
        return AnchorView(
            model=m, stem=stem, blocks=blocks, head=m.forward_head, head_modules=[m.linear],
            block_stages=block_stages, layout="nchw", stitch_stages=_all_but_last(3), isotropic=False,
        )


_register_timm_families()
_register_cifar_family()

"""Hand-written adapters, kept where a family predates the generic splitter or needs a non-default
convention (SN-Net stitches ResNets in the two middle stages only). They take priority over
:mod:`snnet.families.generic` for their classes."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from snnet.families.base import AnchorView, register_family


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

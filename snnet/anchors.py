"""Creating anchors (timm names, hub weights or local checkpoints) and the network from a config."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn

import snnet.models  # noqa: F401  (registers the CIFAR ResNets in timm)
from snnet.network import StitchableNetwork


def expand_path(path: str | os.PathLike) -> Path:
    """``~`` and ``$VARS`` expanded, so configs can say ``$SNNET_ANCHOR_DIR/resnet20-12fca82f.th``."""
    expanded = os.path.expanduser(os.path.expandvars(str(path)))
    if "$" in expanded:
        raise ValueError(f"unset environment variable in path {str(path)!r} (expanded to {expanded!r})")
    return Path(expanded)


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; did you mean one of {close}?" if close else "; see timm.list_models()"
        raise ValueError(f"unknown anchor model {name!r}{hint}")


def create_anchor(name: str, pretrained: bool = False, checkpoint: str | None = None, **kwargs: Any) -> nn.Module:
    """A timm model by name: hub weights with ``pretrained``, or a local checkpoint (weights_only)."""
    check_model_name(name)
    if checkpoint is not None:
        path = expand_path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint for anchor {name!r} not found: {path}")
        return timm.create_model(name, pretrained=False, checkpoint_path=str(path), **kwargs)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


@dataclass
class NetworkConfig:
    """Which anchors to stitch and how (SN-Net's defaults: kernel 2, stride 1, nearest pairs).

    ``checkpoints`` gives one local file (or null) per anchor, or is empty/null for none (on the
    command line ``--model.network.checkpoints []``); ``model_kwargs`` go to every
    ``timm.create_model`` call (e.g. ``num_classes``, ``img_size``). ``two_way``: SN-Netv2's
    configuration space; ``stitch_lora_rank``: LoRA stitching layers of that rank (0: plain).
    """

    anchors: list[str]
    pretrained: bool = True
    checkpoints: list[str | None] | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    kernel_size: int = 2
    stride: int = 1
    nearest: bool = True
    stitch_stages: list[int] | None = None
    input_size: tuple[int, int, int] | None = None
    two_way: bool = False
    stitch_lora_rank: int = 0

    def __post_init__(self) -> None:
        if not self.anchors:
            raise ValueError("network.anchors is empty: list at least one timm model name")
        if self.checkpoints and len(self.checkpoints) != len(self.anchors):
            raise ValueError(
                f"network.checkpoints has {len(self.checkpoints)} entries for {len(self.anchors)} anchors {self.anchors}"
            )
        for name in self.anchors:
            check_model_name(name)


def build_network(cfg: NetworkConfig) -> StitchableNetwork:
    checkpoints = cfg.checkpoints or [None] * len(cfg.anchors)
    anchors = [
        create_anchor(name, pretrained=cfg.pretrained and ckpt is None, checkpoint=ckpt, **cfg.model_kwargs)
        for name, ckpt in zip(cfg.anchors, checkpoints)
    ]
    return StitchableNetwork(
        anchors, names=cfg.anchors, kernel_size=cfg.kernel_size, stride=cfg.stride, nearest=cfg.nearest,
        stitch_stages=cfg.stitch_stages, input_size=cfg.input_size, two_way=cfg.two_way,
        stitch_lora_rank=cfg.stitch_lora_rank,
    )

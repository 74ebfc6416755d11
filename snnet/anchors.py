"""Creating anchors (timm names, hub weights or local checkpoints) and the network from a config."""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch.nn as nn

import snnet.models  # noqa: F401  (registers the CIFAR ResNets in timm)
from snnet.families import anchor_view
from snnet.network import StitchableNetwork

Source = Literal["timm", "torchvision", "class_path"]
SOURCES: tuple[str, ...] = ("timm", "torchvision", "class_path")


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
class AnchorSpec:
    """One anchor: a model ``name`` from ``source`` with its own ``kwargs`` and weights.

    ``source``: a timm name, a torchvision classification model name, or ``class_path`` (a dotted
    ``pkg.module.Class`` built with ``kwargs``). ``pretrained``/``checkpoint`` default to the network's.
    ``blocks`` names the block modules for the generic splitter (any ``nn.Module``).
    """

    name: str
    source: Source = "timm"
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    pretrained: bool | None = None
    blocks: list[str] | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"anchor {self.name!r}: unknown source {self.source!r}; choose one of {SOURCES}")
        if self.source == "timm":
            check_model_name(self.name)
        elif self.source == "torchvision":
            from snnet.families.torchvision_models import check_torchvision_name

            check_torchvision_name(self.name)


def _import_class(path: str) -> type:
    module, _, cls = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"class_path anchor {path!r} cannot be imported: {err}") from None


def create_from_spec(spec: AnchorSpec, pretrained: bool, model_kwargs: dict[str, Any]) -> nn.Module:
    """The anchor of ``spec`` (its kwargs over the network's ``model_kwargs``), weights loaded."""
    kwargs = {**model_kwargs, **spec.kwargs}
    pretrained = spec.pretrained if spec.pretrained is not None else pretrained
    if spec.source == "timm":
        return create_anchor(spec.name, pretrained=pretrained and spec.checkpoint is None, checkpoint=spec.checkpoint, **kwargs)
    if spec.source == "torchvision":
        from snnet.families.torchvision_models import create_torchvision

        path = expand_path(spec.checkpoint) if spec.checkpoint else None
        return create_torchvision(spec.name, pretrained=pretrained and path is None, checkpoint=path, **kwargs)
    model = _import_class(spec.name)(**kwargs)
    if spec.checkpoint is not None:
        from snnet.families.torchvision_models import load_state_dict_file

        load_state_dict_file(model, expand_path(spec.checkpoint), spec.name)
    return model


@dataclass
class NetworkConfig:
    """Which anchors to stitch and how (SN-Net's defaults: kernel 2, stride 1, nearest pairs).

    ``anchors`` entries are timm names or per-anchor mappings ``{name, source, kwargs, checkpoint,
    pretrained, blocks}`` (:class:`AnchorSpec`). ``imports`` are modules imported first, e.g. ones
    that register timm models or family adapters. ``checkpoints`` gives one local file (or null)
    per anchor, or is empty/null for none (on the command line ``--model.network.checkpoints []``);
    ``model_kwargs`` go to every anchor (a spec's ``kwargs`` win). ``two_way``: SN-Netv2's
    configuration space; ``stitch_lora_rank``: LoRA stitching layers of that rank (0: plain).
    """

    anchors: list[str | dict[str, Any]]
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
    imports: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.anchors:
            raise ValueError("network.anchors is empty: list at least one timm model name or anchor mapping")
        if self.checkpoints and len(self.checkpoints) != len(self.anchors):
            raise ValueError(
                f"network.checkpoints has {len(self.checkpoints)} entries for {len(self.anchors)} anchors {self.anchors}"
            )
        for module in self.imports:
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise ValueError(f"network.imports: cannot import {module!r}: {err}") from None
        self.specs()  # validates every entry

    def specs(self) -> list[AnchorSpec]:
        """Every anchor as an :class:`AnchorSpec` (``checkpoints`` fill specs that name none)."""
        checkpoints = self.checkpoints or [None] * len(self.anchors)
        specs = []
        for entry, ckpt in zip(self.anchors, checkpoints):
            if isinstance(entry, str):
                specs.append(AnchorSpec(entry, checkpoint=ckpt))
            elif isinstance(entry, dict):
                unknown = set(entry) - {f.name for f in dataclasses.fields(AnchorSpec)}
                if unknown or "name" not in entry:
                    raise ValueError(f"network.anchors entry {entry}: needs 'name'; unknown keys {sorted(unknown)}; "
                                     f"valid keys {[f.name for f in dataclasses.fields(AnchorSpec)]}")
                spec = AnchorSpec(**entry)
                specs.append(dataclasses.replace(spec, checkpoint=spec.checkpoint or ckpt))
            else:
                raise ValueError(f"network.anchors entry {entry!r} is neither a model name nor a mapping")
        return specs

    def without_weights(self) -> "NetworkConfig":
        """The same network with random weights (no hub, no files): for loading a saved state."""
        anchors = [a if isinstance(a, str) else {**a, "checkpoint": None, "pretrained": False} for a in self.anchors]
        return dataclasses.replace(self, anchors=anchors, pretrained=False, checkpoints=None)


def build_network(cfg: NetworkConfig) -> StitchableNetwork:
    specs = cfg.specs()
    anchors = [create_from_spec(spec, cfg.pretrained, cfg.model_kwargs) for spec in specs]
    for spec, model in zip(specs, anchors):
        if spec.blocks is not None:
            anchor_view(model, blocks=spec.blocks, input_size=cfg.input_size)  # cached: the network reuses it
    net = StitchableNetwork(
        anchors, names=[spec.name.rpartition(".")[2] if spec.source == "class_path" else spec.name for spec in specs],
        kernel_size=cfg.kernel_size, stride=cfg.stride, nearest=cfg.nearest,
        stitch_stages=cfg.stitch_stages, input_size=cfg.input_size, two_way=cfg.two_way,
        stitch_lora_rank=cfg.stitch_lora_rank,
    )
    by_model = {id(m): spec for spec, m in zip(specs, anchors)}  # the network orders anchors by FLOPs
    net.anchor_specs = [
        dataclasses.replace(by_model[id(m)], kwargs={**cfg.model_kwargs, **by_model[id(m)].kwargs}, checkpoint=None, pretrained=False)
        for m in net.anchors
    ]
    return net

"""Creating anchors: timm names, torchvision names or any class path, with hub weights or local checkpoints."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch.nn as nn

import snnet.models  # noqa: F401  (registers the CIFAR ResNets in timm)
from snnet.errors import did_you_mean
from snnet.moved import moved_attribute

Source = Literal["timm", "torchvision", "class_path", "transformers"]
SOURCES: tuple[str, ...] = ("timm", "torchvision", "class_path", "transformers")


def expand_path(path: str | os.PathLike) -> Path:
    """``~`` and ``$VARS`` expanded, so configs can say ``$SNNET_ANCHOR_DIR/resnet20-12fca82f.th``."""
    expanded = os.path.expanduser(os.path.expandvars(str(path)))
    if "$" in expanded:
        raise ValueError(f"unset environment variable in path {str(path)!r} (expanded to {expanded!r})")
    return Path(expanded)


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        raise ValueError(f"unknown anchor model {name!r}" + did_you_mean(name, timm.list_models(), "; see timm.list_models()"))


def create_anchor(name: str, pretrained: bool = False, checkpoint: str | None = None, **kwargs: Any) -> nn.Module:
    """A timm model by name: hub weights with ``pretrained``, or a local checkpoint (weights_only)."""
    check_model_name(name)
    if checkpoint is not None:
        from snnet.checkpoint_io import load_anchor_weights

        return load_anchor_weights(timm.create_model(name, pretrained=False, **kwargs), expand_path(checkpoint), name, use_ema=True)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


@dataclass
class AnchorSpec:
    """One anchor: a model ``name`` from ``source`` with its own ``kwargs`` and weights.

    ``source``: a timm name, a torchvision classification model name, ``class_path`` (a dotted
    ``pkg.module.Class`` built with ``kwargs``) or ``transformers`` (a causal language model: a local
    directory or hub name loaded with ``from_pretrained``, or ``kwargs: {config: {model_type: llama,
    ...}}`` for random weights; see :mod:`snnet.families.lm`). ``pretrained``/``checkpoint`` default to the network's.
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
    if spec.source == "transformers":
        from snnet.families.lm import load_causal_lm

        unknown = set(kwargs) - {"config"}
        if unknown:
            raise ValueError(f"transformers anchor {spec.name!r}: unknown kwargs {sorted(unknown)}; valid: ['config']")
        return load_causal_lm(spec.name, kwargs.get("config"), pretrained=pretrained)
    model = _import_class(spec.name)(**kwargs)
    if spec.checkpoint is not None:
        from snnet.checkpoint_io import load_anchor_weights

        load_anchor_weights(model, expand_path(spec.checkpoint), spec.name)
    return model


def display_name(spec: AnchorSpec) -> str:
    """The anchor's name in stitch names: a class's own name, a model directory's last component."""
    if spec.source == "class_path":
        return spec.name.rpartition(".")[2]
    if spec.source == "transformers":
        return Path(spec.name.rstrip("/")).name
    return spec.name


def __getattr__(name: str) -> Any:
    """``NetworkConfig`` and ``build_network`` lived here before the layout move (snnet.sn_net.build)."""
    return moved_attribute(__name__, name)

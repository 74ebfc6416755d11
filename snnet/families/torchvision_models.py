"""torchvision classification models as anchors: creation by name, hub or local weights.

torchvision models need no adapter: the generic splitter cuts them (``features``, ``layerN``,
``encoder.layers``). This module only builds them and loads their weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from snnet.errors import did_you_mean


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_torchvision_name(name: str) -> None:
    names = torchvision_names()
    if name not in names:
        raise ValueError(f"unknown torchvision classification model {name!r}" + did_you_mean(name, names))


def create_torchvision(name: str, pretrained: bool = False, checkpoint: Path | None = None, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(name)``: the default hub weights with ``pretrained``, or a
    local state_dict file (torchvision's own ``.pth`` files are plain state_dicts)."""
    import torchvision

    check_torchvision_name(name)
    model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    if checkpoint is not None:
        from snnet.checkpoint_io import load_anchor_weights

        load_anchor_weights(model, checkpoint, name)
    return model

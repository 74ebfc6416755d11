"""The SN-Net network from a config: which anchors to stitch and how."""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any

from snnet.anchors import AnchorSpec, create_from_spec, display_name
from snnet.families import anchor_view
from snnet.sn_net.network import StitchableNetwork


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
    input_size: tuple[int, ...] | None = None  # (C, H, W); (T,) tokens for language models
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
        anchors, names=[display_name(spec) for spec in specs],
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

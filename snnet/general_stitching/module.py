"""General model stitching (Bansal et al. 2021; Traft & Cheney; arXiv 2303.11277): the output of any
block of a frozen sender feeds, through a trained adapter, the input of any block of a frozen
receiver, whatever their families and depths.

Layers are *points between blocks*, the same on both sides: point 0 is the stem output, point k
the output of block k-1 (= the input of block k), point n (the number of blocks) the last block's
output. ``StitchedModel(A, p, B, q, adapter)`` computes ``B.head(B.blocks[q:](adapter(A.blocks[:p](A.stem(x)))))``,
written ``A[:p] -> B[q:]``; stitching a model to itself at ``p == q`` with an identity adapter is
the model itself.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from snnet.anchors import create_anchor
from snnet.config import as_config
from snnet.families import AnchorView, anchor_view, default_input_size
from snnet.general_stitching.adapters import (
    AdapterConfig,
    check_adapter_name,
    create_adapter,
    init_lstsq,
)
from snnet.lstsq import StitchInitConfig
from snnet.optim import decay_groups, warmup_cosine
from snnet.profiling import AnchorProfile, profile_anchor

log = logging.getLogger(__name__)


@dataclass
class ModelSpec:
    """One frozen model: a timm name (the CIFAR ResNets included), a local checkpoint or hub weights.

    An empty ``checkpoint`` means none, like null (on the command line ``--model.sender.checkpoint ""``:
    jsonargparse passes a nested null as a string in subclass mode).
    """

    name: str
    checkpoint: str | None = None
    pretrained: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)  # to timm.create_model, e.g. num_classes, img_size

    def create(self) -> nn.Module:
        checkpoint = self.checkpoint or None
        return create_anchor(self.name, pretrained=self.pretrained and checkpoint is None, checkpoint=checkpoint, **self.kwargs)


def num_points(view: AnchorView) -> int:
    """Stitching points of a view: the stem output plus every block's output."""
    return len(view.blocks) + 1


def check_point(view: AnchorView, point: int, role: str) -> int:
    """``point`` if it is a valid layer of ``view``, else a ValueError naming the valid range."""
    last = len(view.blocks)
    if isinstance(point, bool) or not isinstance(point, int) or not 0 <= point <= last:
        raise ValueError(
            f"{role} layer {point!r} is out of range for {type(view.model).__name__} with {last} blocks: valid layers are "
            f"0..{last} (0 = stem output, k = output of block k-1 = input of block k, {last} = last block's output)"
        )
    return point


def point_shape(profile: AnchorProfile, point: int) -> tuple[int, ...]:
    return profile.stem_shape if point == 0 else profile.block_shapes[point - 1]


def stitch_input_size(model: nn.Module, input_size: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """The image size a model sees: a fixed patch-embedding size (ViT, Swin) wins, as those models
    cannot take another; otherwise the given size (both models see the same images) or the default."""
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed is not None or input_size is None:
        return default_input_size(model)
    return tuple(input_size)


class StitchedModel(nn.Module):
    """``sender[:sender_layer] -> adapter -> receiver[receiver_layer:]`` with both models frozen.

    Both models get ``requires_grad=False`` and stay in eval mode even under ``train()``, so their
    BatchNorm statistics never move; only the adapter trains. The models are shared, not copied
    (many stitched models over the same pair cost no memory).
    """

    def __init__(
        self,
        sender: nn.Module,
        sender_layer: int,
        receiver: nn.Module,
        receiver_layer: int,
        adapter: nn.Module,
        input_size: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size  # the image size the adapter was sized for (None: unknown)
        self.sender_view, self.receiver_view = anchor_view(sender), anchor_view(receiver)
        self.sender_layer = check_point(self.sender_view, sender_layer, "sender")
        self.receiver_layer = check_point(self.receiver_view, receiver_layer, "receiver")
        self.sender, self.receiver, self.adapter = sender, receiver, adapter
        self.sender.requires_grad_(False)
        self.receiver.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "StitchedModel":
        super().train(mode)
        self.sender.eval()
        self.receiver.eval()
        return self

    @property
    def name(self) -> str:
        return f"{model_name(self.sender)}[:{self.sender_layer}] -> {model_name(self.receiver)}[{self.receiver_layer}:]"

    @torch.no_grad()
    def sender_features(self, x: Tensor) -> Tensor:
        """The sender's activation at ``sender_layer`` (no graph: nothing before the adapter trains)."""
        return run_blocks(self.sender_view, self.sender_view.stem(x), 0, self.sender_layer)

    @torch.no_grad()
    def receiver_features(self, x: Tensor) -> Tensor:
        """The receiver's own activation at ``receiver_layer``: what the adapter should imitate."""
        return run_blocks(self.receiver_view, self.receiver_view.stem(x), 0, self.receiver_layer)

    def from_sender(self, h: Tensor) -> Tensor:
        """Logits from sender activations ``h`` (lets callers cache the frozen sender's part)."""
        view = self.receiver_view
        return view.head(run_blocks(view, self.adapter(h), self.receiver_layer, len(view.blocks)))

    def forward(self, x: Tensor) -> Tensor:
        return self.from_sender(self.sender_features(x))

    def init_lstsq(self, images: Tensor, batch_size: int = 100, ridge: float = 0.0) -> None:
        """Least-squares fit of a linear adapter on ``images`` (see :func:`snnet.general_stitching.adapters.init_lstsq`)."""
        chunks = images.split(batch_size)
        x = torch.cat([self.sender_features(c) for c in chunks])
        y = torch.cat([self.receiver_features(c) for c in chunks])
        init_lstsq(self.adapter, x, y, ridge=ridge)


def model_name(model: nn.Module) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def run_blocks(view: AnchorView, h: Tensor, start: int, stop: int) -> Tensor:
    """From point ``start`` to point ``stop`` through ``view``'s blocks."""
    for block in view.blocks[start:stop]:
        h = block(h)
    return h


def profile_pair(
    sender: nn.Module, receiver: nn.Module, input_size: tuple[int, int, int] | None = None
) -> tuple[AnchorProfile, AnchorProfile]:
    """Shapes of every point of both models on the images they will see (one probe forward each)."""
    sender_profile = profile_anchor(anchor_view(sender), stitch_input_size(sender, input_size))
    return sender_profile, profile_anchor(anchor_view(receiver), stitch_input_size(receiver, sender_profile.input_size))


def adapter_between(
    sender: nn.Module,
    sender_layer: int,
    receiver: nn.Module,
    receiver_layer: int,
    config: AdapterConfig,
    profiles: tuple[AnchorProfile, AnchorProfile],
) -> nn.Module:
    """The adapter from the sender's point ``sender_layer`` to the receiver's ``receiver_layer``."""
    sender_view, receiver_view = anchor_view(sender), anchor_view(receiver)
    check_point(sender_view, sender_layer, "sender")
    check_point(receiver_view, receiver_layer, "receiver")
    (in_layout, in_prefix), (out_layout, out_prefix) = sender_view.layout_at(sender_layer), receiver_view.layout_at(receiver_layer)
    return create_adapter(
        config.name, point_shape(profiles[0], sender_layer), point_shape(profiles[1], receiver_layer),
        in_layout, out_layout, bn_before=config.bn_before, bn_after=config.bn_after,
        rescale=config.rescale, in_prefix_tokens=in_prefix, out_prefix_tokens=out_prefix, **config.kwargs,
    )


def build_stitched(
    sender: nn.Module,
    sender_layer: int,
    receiver: nn.Module,
    receiver_layer: int,
    adapter: AdapterConfig = AdapterConfig(),
    input_size: tuple[int, int, int] | None = None,
) -> StitchedModel:
    """A :class:`StitchedModel` with an adapter sized from one probe forward of each model."""
    check_point(anchor_view(sender), sender_layer, "sender")
    check_point(anchor_view(receiver), receiver_layer, "receiver")
    check_adapter_name(adapter.name)
    profiles = profile_pair(sender, receiver, input_size)
    module = adapter_between(sender, sender_layer, receiver, receiver_layer, adapter, profiles)
    return StitchedModel(sender, sender_layer, receiver, receiver_layer, module, profiles[0].input_size)


# --- training ------------------------------------------------------------------------------
@dataclass
class AdapterOptimConfig:
    """AdamW with optional linear warmup, then cosine decay per step (Traft & Cheney: lr 0.002, wd 0.05).

    Weight decay applies to conv/linear weights, not to BatchNorm parameters or biases.
    """

    lr: float = 0.002
    weight_decay: float = 0.05
    min_lr: float = 0.0
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)


class AdapterModule(L.LightningModule):
    """Trains the adapter of a :class:`StitchedModel` with cross-entropy; both models stay frozen.

    ``inputs="sender_features"`` takes batches of the sender's activations at the stitching layer
    instead of images (the similarity grid computes them once for many adapters).
    """

    def __init__(
        self,
        model: StitchedModel,
        optim: AdapterOptimConfig = AdapterOptimConfig(),
        inputs: Literal["images", "sender_features"] = "images",
    ) -> None:
        super().__init__()
        if inputs not in ("images", "sender_features"):
            raise ValueError(f"inputs must be 'images' or 'sender_features', got {inputs!r}")
        self.model = model
        self.optim_cfg = as_config(AdapterOptimConfig, optim)
        self.inputs = inputs
        num_classes = int(getattr(model.receiver, "num_classes"))
        self.val_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) if self.inputs == "images" else self.model.from_sender(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc.update(self(x), y)

    def on_validation_epoch_end(self) -> None:
        self.log("val/acc1", self.val_acc.compute() * 100, prog_bar=True)
        self.val_acc.reset()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def configure_optimizers(self):
        cfg = self.optim_cfg
        optimizer = torch.optim.AdamW(decay_groups(self.model.adapter.parameters(), cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        schedule = warmup_cosine(optimizer, self.trainer.estimated_stepping_batches, cfg.warmup_steps, cfg.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


class GeneralStitchModule(AdapterModule):
    """``snnet fit`` for one general stitch: models and adapter from config, optional least-squares
    init of a linear adapter on un-augmented training images at fit start (once; kept on resume)."""

    def __init__(
        self,
        sender: ModelSpec,
        receiver: ModelSpec,
        sender_layer: int,
        receiver_layer: int,
        adapter: AdapterConfig = AdapterConfig(),
        optim: AdapterOptimConfig = AdapterOptimConfig(),
        ls_init: StitchInitConfig = StitchInitConfig(images=500, batch_size=100),
        input_size: tuple[int, int, int] | None = None,
    ) -> None:
        sender, receiver = as_config(ModelSpec, sender), as_config(ModelSpec, receiver)
        adapter, optim = as_config(AdapterConfig, adapter), as_config(AdapterOptimConfig, optim)
        init_cfg = as_config(StitchInitConfig, ls_init)
        model = build_stitched(sender.create(), sender_layer, receiver.create(), receiver_layer, adapter, input_size)
        super().__init__(model, optim)
        self.init_cfg = init_cfg
        self.save_hyperparameters({
            "sender": asdict(sender), "receiver": asdict(receiver), "sender_layer": sender_layer,
            "receiver_layer": receiver_layer, "adapter": asdict(adapter), "optim": asdict(optim),
            "ls_init": asdict(init_cfg), "input_size": input_size,
        })
        self.register_buffer("adapter_initialised", torch.tensor(False))

    @property
    def data_config(self) -> dict[str, Any]:
        """The sender's timm data config at the stitched model's input size (the images enter the sender)."""
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=self.model.sender)
        cfg["input_size"] = self.model.input_size
        return cfg

    def on_fit_start(self) -> None:
        cfg = self.init_cfg
        if bool(self.adapter_initialised) or cfg.images <= 0 or not self.model.adapter.lstsq_ready:
            return
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "calibration_batch"):
            raise RuntimeError("least-squares init needs a datamodule with calibration_batch(n); set ls_init.images: 0 to skip it")
        images, _ = dm.calibration_batch(cfg.images)
        self.model.init_lstsq(images.to(self.device), batch_size=cfg.batch_size, ridge=cfg.ridge)
        self.adapter_initialised.fill_(True)
        log.info("least-squares initialised the %s adapter on %d images", self.model.adapter.name, len(images))

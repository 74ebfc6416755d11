"""Small builders shared by the module-level tests (tiny CIFAR ResNets on the offline digits)."""
from __future__ import annotations

import lightning as L

from snnet.anchors import NetworkConfig
from snnet.data import DigitsDataModule
from snnet.module import DistillConfig, OptimConfig, SNNetModule, StitchInitConfig


class RecordStitches(L.Callback):
    """Remembers which configuration every training step sampled."""

    def __init__(self) -> None:
        self.stitches: list[int] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.stitches.append(module.last_stitch)


def tiny_module(seed: int = 0, teacher: str | None = "largest_anchor", optim: OptimConfig | None = None, **kwargs) -> SNNetModule:
    L.seed_everything(seed)
    return SNNetModule(
        network=NetworkConfig(anchors=["cifar_resnet8", "cifar_resnet14"], pretrained=False, input_size=(3, 16, 16)),
        optim=optim or OptimConfig(lr=1e-3, warmup_steps=2),
        distill=DistillConfig(teacher=teacher),
        stitch_init=StitchInitConfig(images=32, batch_size=16),
        seed=seed,
        **kwargs,
    )


def tiny_data(module: SNNetModule, **kw) -> DigitsDataModule:
    kw = {"batch_size": 16, "train_limit": 96, "val_limit": 32, "num_workers": 0, **kw}
    return DigitsDataModule(data_config=module.data_config, **kw)

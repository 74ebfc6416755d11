"""Pretraining the quickstart's anchor family offline: CIFAR-style ResNet-20 at widths 4 / 8 / 16
on distorted digits.

The quickstart needs a *pretrained* family and no network, whose members differ clearly in cost and
accuracy: on the plain digits every ResNet reaches 97-99 %, so the task is the digits under fixed
random distortions (:func:`snnet.data.distort_digits`, 4 views per digit), where width shows. The
three train in under 2 minutes on 2 CPU cores and are saved as safetensors (about 1.4 MB together).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import resolve_data_config

import snnet.models  # noqa: F401  (registers cifar_resnet*)
from snnet.data import DigitsDataModule

log = logging.getLogger(__name__)
QUICKSTART_ANCHORS: tuple[str, ...] = ("cifar_resnet20_w4", "cifar_resnet20_w8", "cifar_resnet20")
# the task of configs/quickstart.yaml: DigitsDataModule(distortion=1, copies=4)
QUICKSTART_DISTORTION, QUICKSTART_COPIES = 1.0, 4


def pretrain_anchor(name: str, datamodule: DigitsDataModule, epochs: int, lr: float, seed: int) -> tuple[torch.nn.Module, float]:
    """Train one anchor from scratch (AdamW, cosine), return it with its validation top-1 (%)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=datamodule.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    loader = datamodule.train_dataloader()
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loader))
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in datamodule.val_dataloader():
            correct += (model(x).argmax(-1) == y).sum()
            total += len(y)
    return model, float(correct) / total * 100


def pretrain_anchors(
    out_dir: str | Path = "outputs/quickstart/anchors",
    names: Sequence[str] = QUICKSTART_ANCHORS,
    image_size: int = 16,
    epochs: int = 6,
    lr: float = 6e-3,
    seed: int = 0,
    distortion: float = QUICKSTART_DISTORTION,
    copies: int = QUICKSTART_COPIES,
    batch_size: int = 128,
) -> dict[str, float]:
    """Pretrain each anchor on the digits and write ``<out_dir>/<name>.safetensors``; returns top-1 per anchor.

    ``distortion`` / ``copies``: the :class:`DigitsDataModule` task to pretrain on (the fit config's).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_config = resolve_data_config(model=timm.create_model(names[0]))
    data_config["input_size"] = (3, image_size, image_size)
    datamodule = DigitsDataModule(data_config=data_config, batch_size=batch_size, num_workers=0, distortion=distortion, copies=copies)
    accuracy = {}
    for name in names:
        start = time.perf_counter()
        model, acc = pretrain_anchor(name, datamodule, epochs, lr, seed)
        save_file(model.state_dict(), out / f"{name}.safetensors")
        accuracy[name] = acc
        print(f"{name}: top-1 {acc:.2f}% on the digits validation split ({time.perf_counter() - start:.0f} s) -> {out / f'{name}.safetensors'}")
    return accuracy

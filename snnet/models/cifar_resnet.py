"""CIFAR ResNets of He et al. (2016), registered in timm as ``cifar_resnet{8,14,20,32,44,56}``.

Three stages of ``n`` BasicBlocks with widths (16, 32, 64) and option-A shortcuts (stride-2
subsampling plus zero channel padding, no parameters). Parameter names follow the public
pytorch_resnet_cifar10 project, so its checkpoints (``resnet20-12fca82f.th`` ...) load with
``timm.create_model("cifar_resnet20", checkpoint_path=...)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"


class BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.stride = stride
        self.pad = out_chs - in_chs

    def shortcut(self, x: Tensor) -> Tensor:
        """Option A: subsample by the stride, zero-pad the new channels equally on both sides."""
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs, with timm's ``forward_features``/``forward_head`` split."""

    def __init__(
        self,
        depth: int = 20,
        widths: tuple[int, int, int] = (16, 32, 64),
        num_classes: int = 10,
        in_chans: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.depths = (n, n, n)
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_chs = widths[0]
        for i, width in enumerate(widths):
            blocks = [BasicBlock(in_chs if b == 0 else width, width, 2 if (b == 0 and i > 0) else 1) for b in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_chs = width
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.linear(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _unwrap_checkpoint(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The published files wrap weights in ``{"state_dict": ...}`` with DataParallel's ``module.``."""
    state_dict = state_dict.get("state_dict", state_dict)
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url, "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
        "interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "first_conv": "conv1", "classifier": "linear", "license": "bsd-2-clause", **kwargs,
    }


# Published weights (file names carry their sha256 prefix); 8 and 14 are small quickstart anchors.
PRETRAINED_FILES = {
    20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th", 56: "resnet56-4bfd9763.th",
}
DEPTHS = (8, 14, 20, 32, 44, 56)


def pretrained_checkpoints(anchor_dir: str | Path) -> dict[str, str]:
    """timm name -> checkpoint path of every published CIFAR ResNet in ``anchor_dir`` (e.g.
    ``$SNNET_ANCHOR_DIR``), smallest first: the family the tools and configs use."""
    return {f"cifar_resnet{d}": str(Path(anchor_dir) / f) for d, f in sorted(PRETRAINED_FILES.items())}
BASE_WIDTHS = (4, 8)  # narrow variants ``cifar_resnet{depth}_w{base}``: widths (base, 2 base, 4 base), no published weights
default_cfgs = generate_default_cfgs({
    **{f"cifar_resnet{d}": _cfg(_AKAMASTER + PRETRAINED_FILES[d] if d in PRETRAINED_FILES else "") for d in DEPTHS},
    **{f"cifar_resnet{d}_w{b}": _cfg() for d in DEPTHS for b in BASE_WIDTHS},
})


def _register(depth: int, base_width: int | None = None) -> None:
    """One timm entry point per depth (and narrow width) -- no copy-pasted functions."""
    name = f"cifar_resnet{depth}" + (f"_w{base_width}" if base_width else "")
    widths = {} if base_width is None else {"widths": (base_width, 2 * base_width, 4 * base_width)}

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
        return build_model_with_cfg(
            CifarResNet, name, pretrained, depth=depth, pretrained_filter_fn=_unwrap_checkpoint, **widths, **kwargs
        )

    entrypoint.__name__ = entrypoint.__qualname__ = name
    globals()[name] = register_model(entrypoint)


for _depth in DEPTHS:
    _register(_depth)
    for _base in BASE_WIDTHS:
        _register(_depth, _base)

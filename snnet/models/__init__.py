"""Model definitions snnet adds to timm's registry (importing this registers them)."""
from snnet.models.cifar_resnet import CifarResNet

__all__ = ["CifarResNet"]

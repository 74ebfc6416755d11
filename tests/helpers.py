"""Small builders shared by the module-level tests (tiny CIFAR ResNets on the offline digits)."""
from __future__ import annotations

import lightning as L
import torch

from snnet.sn_net.build import NetworkConfig, build_network
from snnet.data import DigitsDataModule
from snnet.sn_net.module import DistillConfig, OptimConfig, SNNetModule, StitchInitConfig


class RecordStitches(L.Callback):
    """Remembers which configuration every training step sampled."""

    def __init__(self) -> None:
        self.stitches: list[int] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.stitches.append(module.last_stitch)


def tiny_module(seed: int = 0, teacher: str | None = "largest_anchor", optim: OptimConfig | None = None,
                network: dict | None = None, **kwargs) -> SNNetModule:
    """Two random-init CIFAR ResNets at 16 px; ``network``: more NetworkConfig fields (two_way, ...)."""
    L.seed_everything(seed)
    return SNNetModule(
        network=NetworkConfig(anchors=["cifar_resnet8", "cifar_resnet14"], pretrained=False, input_size=(3, 16, 16), **(network or {})),
        optim=optim or OptimConfig(lr=1e-3, warmup_steps=2),
        distill=DistillConfig(teacher=teacher),
        stitch_init=StitchInitConfig(images=32, batch_size=16),
        seed=seed,
        **kwargs,
    )


def tiny_data(module: SNNetModule, **kw) -> DigitsDataModule:
    kw = {"batch_size": 16, "train_limit": 96, "val_limit": 32, "num_workers": 0, **kw}
    return DigitsDataModule(data_config=module.data_config, **kw)


def assert_forward_many_is_one_at_a_time(net, x) -> None:
    """``forward_many`` over every configuration (in reverse order) equals each stitch run alone, bit for bit."""
    ids = list(range(net.num_configs))
    with torch.no_grad():
        many = net.forward_many(x, ids[::-1])
        for s in ids:
            assert torch.equal(many[s], net(x, s)), s


def assert_path_parameters_are_what_a_step_updates(net, x) -> None:
    """For every configuration, ``path_parameters`` is exactly the set a backward gives gradients,
    and its size is the configuration's parameter count."""
    for stitch in range(net.num_configs):
        net.zero_grad(set_to_none=True)
        net(x, stitch).sum().backward()
        with_grad = {id(p) for p in net.parameters() if p.grad is not None}
        params = net.path_parameters(stitch)
        assert {id(p) for p in params} == with_grad, stitch
        assert sum(p.numel() for p in params) == net.infos[stitch].params
    net.zero_grad(set_to_none=True)


def perturbed_network(config: NetworkConfig, layer_std: float = 0.1, mean_std: float = 0.1, var_range=(0.5, 1.5)):
    """The network of ``config`` (seed 0, eval mode) with random stitching layers and BatchNorm running
    statistics that are not the data's, so that tests see the statistics a path uses."""
    torch.manual_seed(0)
    net = build_network(config).eval()
    with torch.no_grad():
        for p in net.stitch_layers.parameters():
            p.normal_(0, layer_std)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, mean_std)
                m.running_var.uniform_(*var_range)
    return net

"""General stitching: layer points, frozen models, a short Lightning fit, CNN -> transformer."""
import copy

import lightning as L
import pytest
import timm
import torch

import snnet.models  # noqa: F401  (registers the CIFAR ResNets)
from snnet.general_stitching.adapters import AdapterConfig, init_lstsq
from snnet.data import DigitsDataModule
from snnet.general_stitching.module import AdapterOptimConfig, GeneralStitchModule, ModelSpec, build_stitched
from snnet.sn_net.module import StitchInitConfig

SIZE = (3, 16, 16)


def tiny(name="cifar_resnet8", seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name).eval()


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)


@pytest.mark.parametrize("point", [0, 1, 2, 3])
def test_self_stitch_with_identity_adapter_is_the_model(point):
    model = tiny()
    stitched = build_stitched(model, point, model, point, AdapterConfig("linear"), SIZE)
    proj = stitched.adapter.core.proj
    with torch.no_grad():
        proj.weight.copy_(torch.eye(proj.in_channels)[:, :, None, None])
        proj.bias.zero_()
    x = torch.randn(4, *SIZE)
    torch.testing.assert_close(stitched(x), model(x), rtol=0, atol=1e-6)


def test_low_sender_layer_into_high_receiver_layer_runs():
    sender, receiver = tiny("cifar_resnet8"), tiny("cifar_resnet14", seed=1)
    stitched = build_stitched(sender, 1, receiver, 6, AdapterConfig("bottleneck", bn_before=True, bn_after=True), SIZE)
    assert stitched.name == "cifar_resnet8[:1] -> cifar_resnet14[6:]"
    assert stitched.adapter.in_grid == (16, 16) and stitched.adapter.out_grid == (4, 4)  # bilinear 16 -> 4
    assert stitched(torch.randn(2, *SIZE)).shape == (2, 10)


@pytest.mark.parametrize("role, layers, message", [
    ("sender", (4, 0), r"sender layer 4 is out of range for CifarResNet with 3 blocks: valid layers are 0\.\.3"),
    ("sender", (-1, 0), r"sender layer -1 is out of range .* valid layers are 0\.\.3"),
    ("receiver", (0, 8), r"receiver layer 8 is out of range for CifarResNet with 6 blocks: valid layers are 0\.\.6"),
])
def test_layer_out_of_range_names_the_valid_range(role, layers, message):
    with pytest.raises(ValueError, match=message):
        build_stitched(tiny("cifar_resnet8"), layers[0], tiny("cifar_resnet14"), layers[1], AdapterConfig(), SIZE)


def test_unknown_adapter_name_lists_the_registry():
    with pytest.raises(ValueError, match=r"unknown adapter 'resnet'; choose one of \['bottleneck', 'conv3x3_relu', 'linear', 'linear_relu'\]"):
        build_stitched(tiny(), 1, tiny(), 1, AdapterConfig("resnet"), SIZE)


def test_train_mode_keeps_the_frozen_models_in_eval():
    stitched = build_stitched(tiny("cifar_resnet8"), 1, tiny("cifar_resnet14"), 2, AdapterConfig("bottleneck"), SIZE).train()
    assert stitched.adapter.training
    assert not any(m.training for m in [*stitched.sender.modules(), *stitched.receiver.modules()])
    assert not any(p.requires_grad for p in [*stitched.sender.parameters(), *stitched.receiver.parameters()])


def test_cnn_to_vit_stitch_trains_only_the_adapter_and_makes_a_mean_class_token():
    sender, receiver = tiny("cifar_resnet8"), tiny_vit()
    stitched = build_stitched(sender, 2, receiver, 1, AdapterConfig("conv3x3_relu", bn_before=True), SIZE).train()
    x = torch.randn(4, *SIZE)
    tokens = stitched.adapter(stitched.sender_features(x))
    assert tokens.shape == stitched.receiver_features(x).shape == (4, 17, 32)  # 4x4 patches + class token
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(dim=1))
    stitched(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in stitched.adapter.parameters())
    assert all(p.grad is None for p in [*sender.parameters(), *receiver.parameters()])


def _module(adapter: str, ls_images: int, lr: float = 0.002) -> GeneralStitchModule:
    L.seed_everything(0)
    return GeneralStitchModule(
        sender=ModelSpec("cifar_resnet8"), receiver=ModelSpec("cifar_resnet14"), sender_layer=1, receiver_layer=3,
        adapter=AdapterConfig(adapter, bn_before=True, bn_after=True), optim=AdapterOptimConfig(lr=lr),
        ls_init=StitchInitConfig(images=ls_images, batch_size=16), input_size=SIZE,
    )


def _fit(module: GeneralStitchModule, steps: int) -> DigitsDataModule:
    data = DigitsDataModule(data_config=module.data_config, batch_size=16, train_limit=96, val_limit=32, num_workers=0)
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(module, data)
    return data


def test_short_fit_changes_the_adapter_and_nothing_frozen():
    module = _module("bottleneck", ls_images=0)
    frozen = copy.deepcopy({"sender": module.model.sender.state_dict(), "receiver": module.model.receiver.state_dict()})
    adapter_before = copy.deepcopy(module.model.adapter.state_dict())
    _fit(module, steps=4)
    for side in ("sender", "receiver"):  # weights and BN running statistics, bit for bit
        after = getattr(module.model, side).state_dict()
        assert all(torch.equal(frozen[side][k], after[k]) for k in after)
    adapter_after = module.model.adapter.state_dict()
    assert any(not torch.equal(adapter_before[k], adapter_after[k]) for k in adapter_after if k.endswith("weight"))
    assert module.data_config["input_size"] == SIZE


def test_fit_starts_from_the_least_squares_fit_on_calibration_images():
    module = _module("linear", ls_images=48, lr=0.0)  # lr 0: the fit leaves the init in place
    data = _fit(module, steps=1)
    assert bool(module.adapter_initialised)
    reference = build_stitched(module.model.sender, 1, module.model.receiver, 3, AdapterConfig("linear", True, True), SIZE)
    images, _ = data.calibration_batch(48)
    init_lstsq(reference.adapter, reference.sender_features(images), reference.receiver_features(images))
    torch.testing.assert_close(module.model.adapter.core.proj.weight, reference.adapter.core.proj.weight, rtol=0, atol=1e-5)

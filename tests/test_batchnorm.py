"""Per-path BatchNorm statistics: calibration equals torch's update_bn run on each configuration
alone, leaves the layers' own buffers alone, holds for every way of running a path (one, many, rows,
exported), survives a state dict round trip, and keeps frozen anchors exactly as they were."""
import copy

import pytest
import torch

from helpers import perturbed_network, tiny_data, tiny_module
from snnet.sn_net.build import NetworkConfig, build_network
from snnet.deploy.export import export_stitch, extract_stitch, load_stitch

CIFAR = NetworkConfig(anchors=["cifar_resnet8", "cifar_resnet14"], pretrained=False, input_size=(3, 16, 16))


def perturbed(config: NetworkConfig = CIFAR):
    """Random stitching layers and anchors whose running statistics are far from the calibration data's."""
    return perturbed_network(config, layer_std=0.3, mean_std=0.5, var_range=(0.2, 3.0))


def calibration_images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return list((torch.randn(48, 3, 16, 16, generator=g) * 2 + 0.5).split(16))


def update_bn(batches, module) -> None:
    """``torch.optim.swa_utils.update_bn`` over the BatchNorm layers an exported path holds (it keeps
    the anchors' module trees; the layers of blocks it does not run hold no buffers)."""
    layers = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    with torch.no_grad():
        for x in batches:
            module(x)


def layer_state(net) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("bn_bank.")}


@pytest.fixture(scope="module")
def calibrated():
    net = perturbed()
    before = layer_state(net)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        shared = {i: net(x, i) for i in range(net.num_configs)}
    images = net.calibrate_batchnorm(calibration_images())
    return net, before, x, shared, images


def test_each_path_gets_what_update_bn_gives_that_configuration_alone(calibrated):
    net, _, x, shared, images = calibrated
    assert images == 48
    for stitch in range(net.num_configs):
        alone = extract_stitch(perturbed(), stitch)  # the same weights, no bank: the layers' statistics
        update_bn(calibration_images(), alone)
        alone.eval()
        with torch.no_grad():
            expected, got = alone(x), net(x, stitch)
        assert torch.allclose(got, expected, atol=1e-5), (stitch, (got - expected).abs().max())
        assert not torch.allclose(got, shared[stitch], atol=1e-2), stitch  # and the statistics did change


def test_calibration_writes_no_layer_buffer_and_training_mode_ignores_the_bank(calibrated):
    net, before, x, _, _ = calibrated
    after = layer_state(net)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    fresh = perturbed().train()
    net.train()
    try:
        with torch.no_grad():  # batch statistics: same outputs with or without calibration
            assert torch.equal(net(x, 3), fresh(x, 3))
    finally:
        net.eval()


def test_many_rows_and_export_run_each_path_with_its_own_statistics(calibrated, tmp_path):
    net, _, x, _, _ = calibrated
    ids = list(range(net.num_configs))
    with torch.no_grad():
        alone = {i: net(x, i) for i in ids}
        many = net.forward_many(x, ids[::-1])
        rows = net.forward_rows(x, [i % net.num_configs for i in range(len(x))])
    for i in ids:
        assert torch.equal(many[i], alone[i]), i
    for r in range(len(x)):
        assert torch.allclose(rows[r], alone[r % net.num_configs][r], atol=1e-5), r
    stitch = net.num_anchors + 1
    with torch.no_grad():
        assert torch.allclose(extract_stitch(net, stitch).eval()(x), alone[stitch], atol=1e-5)
        assert torch.allclose(load_stitch(export_stitch(net, stitch, tmp_path))(x), alone[stitch], atol=1e-5)


def test_state_dict_round_trip_keeps_the_statistics_and_their_flags(calibrated):
    net, _, x, _, _ = calibrated
    copy_ = build_network(CIFAR).eval()
    assert not any(copy_.bn_bank.ready)
    copy_.load_state_dict(copy.deepcopy(net.state_dict()))
    assert all(copy_.bn_bank.ready)
    with torch.no_grad():
        assert torch.equal(copy_(x, 3), net(x, 3))


def test_frozen_anchors_keep_their_own_statistics():
    net = perturbed()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        shared = {i: net(x, i) for i in range(net.num_configs)}
    net.calibrate_batchnorm(calibration_images(), anchors=False)
    with torch.no_grad():
        for a in range(net.num_anchors):
            assert torch.equal(net(x, a), shared[a]), a
        # a stitch still gets its own statistics after its stitching layer
        assert not torch.allclose(net(x, net.num_anchors), shared[net.num_anchors], atol=1e-2)


def test_a_family_without_batchnorm_has_nothing_to_calibrate():
    net = build_network(NetworkConfig(anchors=["deit_tiny_patch16_224", "deit_small_patch16_224"], pretrained=False,
                                      model_kwargs={"img_size": 32, "depth": 2, "num_classes": 10}))
    assert not net.has_batchnorm and net.bn_bank.num_slots == 0
    assert net.calibrate_batchnorm(iter(())) == 0


def test_fit_calibrates_and_validate_of_its_checkpoint_reproduces_its_accuracies(tmp_path):
    import lightning as L

    module = tiny_module(bn_calibration={"images": 48, "batch_size": 16})
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_train_batches=3)
    data = tiny_data(module)
    trainer.fit(module, datamodule=data)
    assert all(module.net.bn_bank.ready)
    fit_acc = {r.id: r.acc1 for r in module.results}
    ckpt = trainer.checkpoint_callback.best_model_path
    restored = type(module).load_from_checkpoint(ckpt, weights_only=True)
    assert all(restored.net.bn_bank.ready)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(restored, datamodule=tiny_data(restored))
    assert {r.id: r.acc1 for r in restored.results} == fit_acc


def test_checkpoints_from_before_the_bank_load_uncalibrated():
    module = tiny_module()
    state = {k: v for k, v in module.state_dict().items() if ".bn_bank." not in k}
    checkpoint = {"state_dict": state}
    module.strict_loading = False
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    assert not any(module.net.bn_bank.ready)


def test_every_checkpoint_holds_the_statistics_of_its_own_weights(tmp_path):
    """Step checkpoints are written before the epoch's validation: each is calibrated for its own step."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = tiny_module(bn_calibration={"images": 48, "batch_size": 16})
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[every_step], limit_train_batches=3, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=tiny_data(module))
    paths = sorted((tmp_path / "ckpts").glob("*.ckpt"))
    assert len(paths) == 3
    images, _ = tiny_data(module).calibration_batch(48)
    for path in paths:
        restored = type(module).load_from_checkpoint(path, weights_only=True)
        saved = {k: v.clone() for k, v in restored.net.bn_bank.state_dict().items()}
        assert saved["calibrated"].all(), path.name
        restored.net.calibrate_batchnorm(images.split(16))
        assert all(torch.equal(v, restored.net.bn_bank.state_dict()[k]) for k, v in saved.items()), path.name


@pytest.mark.parametrize("bad", [{"images": -1}, {"batch_size": 0}])
def test_bad_calibration_settings_name_the_values(bad):
    with pytest.raises(ValueError, match=r"bn_calibration needs images >= 0 \(0: off\) and batch_size >= 1, got .*" + f"{next(iter(bad))}={bad[next(iter(bad))]}"):
        tiny_module(bn_calibration=bad)


def test_path_modules_run_the_layers_own_statistics():
    """``path_modules`` (tools/bench_train.py's plain step) chained is the configuration on the BatchNorm
    layers' own buffers: equal to the network before calibration, not after it for a stitch."""
    net = perturbed()
    x = torch.randn(4, 3, 16, 16)

    def chained(stitch: int) -> torch.Tensor:
        h = x
        for step in net.path_modules(stitch):
            h = step(h)
        return h

    with torch.no_grad():
        for stitch in range(net.num_configs):
            assert torch.equal(chained(stitch), net(x, stitch)), stitch
        net.calibrate_batchnorm(calibration_images())
        stitch = net.num_anchors
        assert not torch.allclose(chained(stitch), net(x, stitch))

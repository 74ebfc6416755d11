"""The CIFAR ResNets of He et al. in timm's registry, and the shared pretrained weights."""
import pytest
import timm
import torch

import snnet.models  # noqa: F401
from snnet.families import anchor_view
from snnet.models.cifar_resnet import PRETRAINED_FILES

# From ../shared/anchors/README.md (parameters, millions) and ../shared/data/README.md (top-1, %).
PUBLISHED_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85}
PUBLISHED_TOP1 = {20: 81.03, 32: 82.56, 44: 82.67, 56: 83.20}


@pytest.mark.parametrize("depth", sorted(PUBLISHED_PARAMS_M))
def test_registered_with_published_size_and_stage_depths(depth):
    model = timm.create_model(f"cifar_resnet{depth}")
    n = (depth - 2) // 6
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == PUBLISHED_PARAMS_M[depth]
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [n, n, n]
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)


def test_option_a_shortcut_has_no_parameters_and_shapes_follow_stages():
    model = timm.create_model("cifar_resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64, 8, 8)
    assert torch.equal(model.forward_head(feats), model(x))
    assert not any("shortcut" in name for name, _ in model.named_parameters())


def test_block_view_reproduces_the_model():
    model = timm.create_model("cifar_resnet14").eval()
    view = anchor_view(model)
    x = torch.randn(2, 3, 32, 32)
    h = view.stem(x)
    for block in view.blocks:
        h = block(h)
    assert torch.allclose(view.head(h), model(x), atol=1e-6)
    assert view.block_stages == [0, 0, 1, 1, 2, 2]


def test_bad_depth_names_rule():
    with pytest.raises(ValueError, match="6n\\+2"):
        snnet.models.CifarResNet(depth=21)


@pytest.mark.parametrize("depth", sorted(PRETRAINED_FILES))
def test_shared_weights_load_through_timm_checkpoint_path(anchor_dir, depth):
    raw = torch.load(anchor_dir / PRETRAINED_FILES[depth], map_location="cpu", weights_only=True)["state_dict"]
    model = timm.create_model(f"cifar_resnet{depth}", checkpoint_path=str(anchor_dir / PRETRAINED_FILES[depth]))
    loaded = model.state_dict()
    unloaded = set(loaded) - {k.removeprefix("module.") for k in raw}
    assert all(k.endswith("num_batches_tracked") for k in unloaded), unloaded  # the files omit these counters
    assert all(torch.equal(loaded[k.removeprefix("module.")], v) for k, v in raw.items())


@pytest.mark.slow
def test_shared_weights_match_published_top1_on_the_full_test_set(anchor_dir, cifar10_root, cifar_data_config):
    from snnet.data import ImageFolderDataModule

    dm = ImageFolderDataModule(str(cifar10_root), val_dir="test", data_config=cifar_data_config, eval_batch_size=500, num_workers=2)
    dm.setup()
    assert len(dm.val_set) == 10_000
    models = {d: timm.create_model(f"cifar_resnet{d}", checkpoint_path=str(anchor_dir / f)).eval() for d, f in PRETRAINED_FILES.items()}
    correct = dict.fromkeys(models, 0)
    with torch.inference_mode():
        for x, y in dm.val_dataloader():
            for d, model in models.items():
                correct[d] += int((model(x).argmax(-1) == y).sum())
    for d, published in PUBLISHED_TOP1.items():
        assert abs(correct[d] / 100 - published) <= 0.1, (d, correct[d] / 100, published)

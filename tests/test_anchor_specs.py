"""Per-anchor specs in the network config: any source, own kwargs and weights, user imports."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torchvision
import yaml

from snnet.sn_net.build import NetworkConfig, build_network
from snnet.cli import main

USER_MODULE = '''
from timm.models import register_model
from timm.models.vision_transformer import _create_vision_transformer


@register_model
def snnet_test_vit_micro(pretrained=False, **kwargs):
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    return _create_vision_transformer("vit_tiny_patch16_224", pretrained=pretrained, **dict(args, **kwargs))
'''


def test_yaml_family_of_custom_widths_and_a_user_registered_model(tmp_path, monkeypatch):
    (tmp_path / "snnet_user_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    vit = {"patch_size": 8, "depth": 2, "num_heads": 2, "img_size": 32}
    config = {"network": {
        "imports": ["snnet_user_models"], "pretrained": False,
        "anchors": [
            {"name": "vit_tiny_patch16_224", "kwargs": {**vit, "embed_dim": 96}},
            {"name": "vit_tiny_patch16_224", "kwargs": {**vit, "embed_dim": 48}},
            "snnet_test_vit_micro",
        ],
    }}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out.json"
    main(["stitches", "--config", str(tmp_path / "cfg.yaml"), "--json", str(out)])
    rows = json.loads(out.read_text())
    # three isotropic depth-2 anchors, windows both ways: 3 + 2 * (3 * 2 - 2)
    assert len(rows) == 11
    assert [r["name"] for r in rows[:3]] == ["snnet_test_vit_micro", "vit_tiny_patch16_224", "vit_tiny_patch16_224#1"]
    net = build_network(NetworkConfig(**config["network"]))
    assert [a.embed_dim for a in net.anchors] == [32, 48, 96]


def test_bad_specs_name_the_bad_value():
    with pytest.raises(ValueError, match="unknown source 'hub'"):
        NetworkConfig(anchors=[{"name": "resnet18", "source": "hub"}])
    with pytest.raises(ValueError, match="unknown torchvision classification model 'resnet19'"):
        NetworkConfig(anchors=[{"name": "resnet19", "source": "torchvision"}])
    with pytest.raises(ValueError, match=r"unknown keys \['width'\]"):
        NetworkConfig(anchors=[{"name": "resnet18", "width": 2}])
    with pytest.raises(ValueError, match="network.imports: cannot import 'no_such_pkg'"):
        NetworkConfig(anchors=["resnet18"], imports=["no_such_pkg"])


def test_torchvision_and_class_path_anchors_load_local_weights_and_named_blocks(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    ckpt = tmp_path / "mnv3.pth"
    torch.save(reference.state_dict(), ckpt)
    blocks = ["features.3", "features.6", "features.9", "features.12"]
    anchors = [
        {"name": "mobilenet_v3_small", "source": "torchvision", "checkpoint": str(ckpt), "kwargs": {"num_classes": 10}},
        {"name": "torchvision.models.mobilenet_v3_small", "source": "class_path", "checkpoint": str(ckpt),
         "kwargs": {"num_classes": 10}, "blocks": blocks},
    ]
    x = torch.randn(2, 3, 64, 64)
    for anchor in anchors:
        config = NetworkConfig(pretrained=True, input_size=(3, 64, 64), anchors=[anchor])
        net = build_network(config).eval()
        for (k, v), w in zip(reference.state_dict().items(), net.anchors[0].state_dict().values()):
            assert torch.equal(v, w), k
        torch.testing.assert_close(net(x, stitch=0), reference.eval()(x))
        plain = config.without_weights()
        assert all(a["checkpoint"] is None and a["pretrained"] is False for a in plain.anchors) and not plain.pretrained
        build_network(plain).load_state_dict(net.state_dict())
    view = net.views[0]  # the user-named blocks were used
    assert len(view.blocks) == 4 and view.blocks[0] is view.model.features[3]


def test_fit_cli_parses_and_builds_per_anchor_specs_with_user_imports_without_running(tmp_path, monkeypatch):
    """`snnet fit --config` (LightningCLI, run=False): per-anchor specs of custom widths, a
    torchvision anchor with named blocks, and a timm model registered by a module in ``imports``."""
    from snnet.trainer_cli import build_cli

    (tmp_path / "snnet_user_models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "snnet_user_models", raising=False)
    vit = {"patch_size": 4, "depth": 2, "num_heads": 2, "img_size": 16, "num_classes": 10}
    config = {
        "trainer": {"max_steps": 1, "logger": False, "enable_checkpointing": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "snnet.sn_net.module.SNNetModule", "init_args": {"network": {
            "imports": ["snnet_user_models"], "pretrained": False, "input_size": [3, 16, 16],
            "anchors": [
                {"name": "vit_tiny_patch16_224", "kwargs": {**vit, "embed_dim": 48}},
                {"name": "snnet_test_vit_micro", "kwargs": vit},
            ],
        }}},
        "data": {"class_path": "snnet.data.DigitsDataModule", "init_args": {"batch_size": 8}},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    cli = build_cli(["--config", str(tmp_path / "fit.yaml")], run=False)  # run=False: no subcommand
    net = cli.model.net
    assert [a.embed_dim for a in net.anchors] == [32, 48]  # ordered by FLOPs: the registered micro ViT first
    assert net.anchor_names == ["snnet_test_vit_micro", "vit_tiny_patch16_224"]
    assert [s.kwargs for s in net.anchor_specs] == [vit, {**vit, "embed_dim": 48}]  # kept for export
    assert cli.trainer.global_step == 0  # parsed and built, not run

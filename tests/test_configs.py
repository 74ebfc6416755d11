"""Every config under configs/ parses (--print_config) and builds (pretrained=False, tiny data)."""
from pathlib import Path

import pytest
from PIL import Image

from snnet.cli import build_cli
from snnet.module import SNNetModule

CONFIGS = Path(__file__).parents[1] / "configs"
EXPECTED_CONFIGS = {
    "quickstart.yaml": 9,
    "cifar10_resnet.yaml": 40,
    "deit_tiny_small_base.yaml": 71,
    "swin_tiny_small_base.yaml": 41,
    "resnet18_resnet50.yaml": 10,
    "resnet18_swin_tiny.yaml": 8,
}


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED_CONFIGS)


@pytest.fixture(scope="module")
def tiny_image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for split in ("train", "val"):
        for label, color in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 40), color).save(root / split / label / f"{i}.jpg")
    return root


def cli(args):
    return build_cli(args, run=False)


@pytest.mark.parametrize("name", sorted(EXPECTED_CONFIGS))
def test_config_prints(name, capsys, monkeypatch):
    monkeypatch.setenv("SNNET_ANCHOR_DIR", "/anchors")
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(CONFIGS / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "network:" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED_CONFIGS))
def test_config_builds_with_random_weights_and_tiny_data(name, tiny_image_folder, tmp_path):
    args = ["--config", str(CONFIGS / name), "--model.network.pretrained", "false",
            "--model.network.checkpoints", "[]", "--model.distill.pretrained", "false",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    if name != "quickstart.yaml":
        args += ["--data", "snnet.data.ImageFolderDataModule", "--data.init_args.root", str(tiny_image_folder),
                 "--data.init_args.val_dir", "val"]
    built = cli(args)
    assert isinstance(built.model, SNNetModule)
    assert built.model.net.num_configs == EXPECTED_CONFIGS[name]
    assert built.datamodule.data_config["input_size"] == built.model.net.profiles[0].input_size
    built.datamodule.setup()
    x, _ = next(iter(built.datamodule.val_dataloader()))
    assert tuple(x.shape[1:]) == built.model.net.profiles[0].input_size

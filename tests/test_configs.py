"""Every config under configs/ parses (--print_config) and builds (pretrained=False, tiny data)."""
from pathlib import Path

import pytest
from PIL import Image

from snnet.trainer_cli import build_cli
from snnet.sn_net.module import SNNetModule

CONFIGS = Path(__file__).parents[1] / "configs"
EXPECTED_CONFIGS = {
    "quickstart.yaml": 11,
    "cifar10_resnet.yaml": 40,
    "deit_tiny_small_base.yaml": 71,
    "swin_tiny_small_base.yaml": 41,
    "resnet18_resnet50.yaml": 10,
    "resnet18_swin_tiny.yaml": 8,
}
GENERAL_STITCH_CONFIGS = {"stitch_resnet20_resnet56.yaml": "cifar_resnet20[:3] -> cifar_resnet56[18:]"}
SIMILARITY_CONFIGS = {"similarity_resnet56_resnet20.yaml": 22}  # stitched layer pairs
STITCHNET_CONFIGS = {"stitchnet_cifar10.yaml": 9 + 15 + 21 + 27}  # fragments in the pool (one per block)
LM_CONFIGS = {"quickstart_lm.yaml": 23}  # built and fitted in tests/test_lm.py (its anchors are directories)


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted([*EXPECTED_CONFIGS, *GENERAL_STITCH_CONFIGS, *SIMILARITY_CONFIGS, *STITCHNET_CONFIGS, *LM_CONFIGS])


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
    if not name.startswith("quickstart"):
        args += ["--data", "snnet.data.ImageFolderDataModule", "--data.init_args.root", str(tiny_image_folder),
                 "--data.init_args.val_dir", "val"]
    built = cli(args)
    assert isinstance(built.model, SNNetModule)
    assert built.model.net.num_configs == EXPECTED_CONFIGS[name]
    assert built.datamodule.data_config["input_size"] == built.model.net.profiles[0].input_size
    built.datamodule.setup()
    x, _ = next(iter(built.datamodule.val_dataloader()))
    assert tuple(x.shape[1:]) == built.model.net.profiles[0].input_size


@pytest.mark.parametrize("name", sorted(GENERAL_STITCH_CONFIGS))
def test_general_stitch_config_builds_with_random_weights(name, tiny_image_folder, tmp_path):
    from snnet.general_stitching.module import GeneralStitchModule

    built = cli(["--config", str(CONFIGS / name), "--model.sender.checkpoint", "", "--model.receiver.checkpoint", "",
                 "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
                 "--data", "snnet.data.ImageFolderDataModule", "--data.init_args.root", str(tiny_image_folder),
                 "--data.init_args.val_dir", "val"])
    assert isinstance(built.model, GeneralStitchModule) and built.model.model.name == GENERAL_STITCH_CONFIGS[name]
    assert built.datamodule.data_config["input_size"] == built.model.model.input_size


@pytest.mark.parametrize("name", sorted(SIMILARITY_CONFIGS))
def test_similarity_config_parses_and_resolves_its_pairs(name, monkeypatch):
    from snnet.families import anchor_view
    from snnet.general_stitching.module import ModelSpec
    from snnet.general_stitching.similarity import parse_similarity, select_pairs

    monkeypatch.setenv("SNNET_ANCHOR_DIR", "/anchors")
    config, _ = parse_similarity(["--config", str(CONFIGS / name), "--data", "snnet.data.DigitsDataModule"])
    sender, receiver = (anchor_view(ModelSpec(spec.name).create()) for spec in (config.sender, config.receiver))  # random weights
    assert len(select_pairs(sender, receiver, config.stitching.pairs, config.stitching.band)) == SIMILARITY_CONFIGS[name]


@pytest.mark.parametrize("name", sorted(STITCHNET_CONFIGS))
def test_stitchnet_config_builds_with_random_weights(name, tiny_image_folder, tmp_path):
    from snnet.stitchnet.module import StitchNetModule

    built = cli(["--config", str(CONFIGS / name), "--model.pool.checkpoints", "[]", "--model.init_args.out_dir", str(tmp_path),
                 "--data", "snnet.data.ImageFolderDataModule", "--data.init_args.root", str(tiny_image_folder),
                 "--data.init_args.val_dir", "val"])
    assert isinstance(built.model, StitchNetModule) and len(built.model.pool) == STITCHNET_CONFIGS[name]
    assert built.trainer.max_epochs == 0 and built.model.configure_optimizers() is None
    assert built.datamodule.data_config["input_size"] == built.model.pool.input_size

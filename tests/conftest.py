"""Shared fixtures (and the quickstart's checkpoint for the serving tests). Real data and pretrained
anchors come from environment variables and skip (naming the variable) when absent; `.ci/run` points
them at ../shared."""
import os
from pathlib import Path

import pytest

ANCHOR_ENV = "SNNET_ANCHOR_DIR"
DATA_ENV = "SNNET_DATA_DIR"


@pytest.fixture(scope="session")
def anchor_dir() -> Path:
    path = os.environ.get(ANCHOR_ENV)
    if not path or not (Path(path) / "resnet20-12fca82f.th").is_file():
        pytest.skip(f"pretrained CIFAR ResNets not found: set {ANCHOR_ENV} to the folder holding resnet20-12fca82f.th (e.g. ../shared/anchors)")
    return Path(path)


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    path = os.environ.get(DATA_ENV)
    if not path or not (Path(path) / "cifar10-jpg.tar.gz").is_file():
        pytest.skip(f"CIFAR-10 JPEG data not found: set {DATA_ENV} to the folder holding cifar10-jpg.tar.gz (e.g. ../shared/data)")
    from snnet.data import extract_cifar10_jpeg

    return extract_cifar10_jpeg(Path(path) / "cifar10-jpg.tar.gz")


@pytest.fixture(scope="session")
def cifar_data_config() -> dict:
    import timm
    from timm.data import resolve_data_config

    import snnet.models  # noqa: F401

    return resolve_data_config(model=timm.create_model("cifar_resnet20"))


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """The quickstart's `snnet fit` (configs/quickstart.yaml), shortened: its three anchors written
    untrained where the config reads them (tools/pretrain_quickstart.py trains them; serving and
    export do not care), a few training steps; its checkpoint and results file. One fit per session,
    shared by the serve and deploy tests."""
    import timm
    import torch
    from safetensors.torch import save_file

    import snnet.models  # noqa: F401  (registers cifar_resnet*)
    from snnet.cli import main
    from snnet.quickstart import QUICKSTART_ANCHORS

    root = tmp_path_factory.mktemp("quickstart")
    anchors = root / "outputs" / "quickstart" / "anchors"
    anchors.mkdir(parents=True)
    for i, name in enumerate(QUICKSTART_ANCHORS):
        torch.manual_seed(i)
        save_file(timm.create_model(name, num_classes=10).state_dict(), anchors / f"{name}.safetensors")
    cwd = os.getcwd()
    os.chdir(root)  # the config writes under ./outputs/quickstart
    os.environ["WANDB_MODE"] = "offline"
    try:
        main(["fit", "--config", str(Path(__file__).parents[1] / "configs" / "quickstart.yaml"), "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2", "--model.init_args.stitch_init.images", "32"])
    finally:
        os.chdir(cwd)
    out = root / "outputs" / "quickstart"
    return next(out.glob("**/last.ckpt")), out / "fit_results.json"

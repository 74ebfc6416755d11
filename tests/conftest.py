"""Shared fixtures. Real data and pretrained anchors come from environment variables and skip
(naming the variable) when absent; `.ci/run` points them at ../shared."""
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

"""DataModules: the offline digits, the shared CIFAR-10 JPEG folders, transforms from timm."""
import random

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from snnet.data import CIFAR10JPEGDataModule, DigitsDataModule, ImageFolderDataModule, TorchvisionCIFARDataModule, distort_digits


def digits(**kw):
    cfg = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bilinear", "crop_pct": 1.0}
    return DigitsDataModule(data_config=cfg, batch_size=32, num_workers=0, **kw)


def test_digits_split_is_fixed_disjoint_and_sized_by_the_data_config():
    dm = digits()
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 1797 and len(dm.val_set) == 359
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32 and y.max() <= 9
    train_images = {tuple(dm.train_set.images[i].ravel()) for i in range(len(dm.train_set))}
    val_images = [tuple(dm.val_set.images[i].ravel()) for i in range(len(dm.val_set))]
    assert sum(v in train_images for v in val_images) < 10  # a few digits are pixel-identical duplicates


def test_calibration_batch_is_deterministic_unaugmented_and_mixed():
    dm = digits(train_transform="timm")
    x1, y1 = dm.calibration_batch(40)
    x2, y2 = dm.calibration_batch(40)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert len(y1.unique()) >= 5


def test_augmented_calibration_batch_is_fixed_augmented_and_leaves_the_global_generators_alone():
    dm = digits(train_transform="timm")
    plain, labels = dm.calibration_batch(40)
    states = torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    x1, y1 = dm.calibration_batch(40, augmented=True)
    assert torch.equal(states[0], torch.random.get_rng_state())
    assert np.array_equal(states[1], np.random.get_state()[1]) and states[2] == random.getstate()
    x2, y2 = dm.calibration_batch(40, augmented=True)
    assert torch.equal(x1, x2) and torch.equal(y1, labels) and torch.equal(y2, labels)  # the same images
    assert not torch.equal(x1, plain)  # through the training transform


def test_limits_and_bad_values():
    dm = digits(train_limit=100, val_limit=50)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (100, 50)
    with pytest.raises(ValueError, match="unknown train_transform 'fancy'"):
        digits(train_transform="fancy")
    with pytest.raises(ValueError, match="data_config is not set"):
        DigitsDataModule().setup()
    with pytest.raises(ValueError, match="unknown CIFAR variant 'cifar11'"):
        TorchvisionCIFARDataModule(variant="cifar11")
    with pytest.raises(FileNotFoundError, match="image folder"):
        ImageFolderDataModule("/nonexistent/imagenet")


def test_cifar10_jpeg_folders(cifar10_root, cifar_data_config):
    # archive=None: found through $SNNET_DATA_DIR, unpacked once to the cache
    dm = CIFAR10JPEGDataModule(data_config=cifar_data_config, num_workers=0, batch_size=16, train_transform="cifar")
    dm.setup()
    assert dm.num_classes == 10 and len(dm.train_set) == 50_000 and len(dm.val_set) == 10_000
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32)
    assert dm.train_set.classes[:3] == ["airplane", "automobile", "bird"]


def test_distorted_digits_are_fixed_views_on_their_side_of_the_split():
    plain, distorted = digits(), digits(distortion=1.0, copies=3)
    plain.setup()
    distorted.setup()
    assert (len(distorted.train_set), len(distorted.val_set)) == (3 * len(plain.train_set), 3 * len(plain.val_set))
    n = len(plain.val_set)
    assert all((distorted.val_set.labels[c * n:(c + 1) * n] == plain.val_set.labels).all() for c in range(3))
    again = digits(distortion=1.0, copies=3)
    again.setup()
    assert (again.val_set.images == distorted.val_set.images).all()  # deterministic
    assert not (distorted.val_set.images[:n] == distorted.val_set.images[n:2 * n]).all()  # the views differ
    images = load_digits().images[:50]
    resized = torch.nn.functional.interpolate(torch.tensor(images, dtype=torch.float32)[:, None] / 16, size=16, mode="bilinear")
    expected = (resized[:, 0] * 255).round().to(torch.uint8).numpy()
    assert (distort_digits(images, 0.0, 1, seed=0) == expected).all()  # strength 0: the digit, only resized
    twice = digits(copies=2)
    twice.setup()
    assert (twice.train_set.images[: len(plain.train_set)] == plain.train_set.images).all()


def test_bad_distortion_values_are_named():
    with pytest.raises(ValueError, match="distortion must be in \\[0, 1\\], got 2"):
        digits(distortion=2)
    with pytest.raises(ValueError, match="copies must be >= 1, got 0"):
        digits(copies=0)

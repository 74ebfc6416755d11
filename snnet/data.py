"""LightningDataModules: ImageFolder (ImageNet layout), the shared CIFAR-10 JPEG archive,
torchvision CIFAR-10/100, and the offline quickstart digits.

All share one mechanism (:class:`ImageDataModule`): transforms come from timm and are sized by the
anchors' data config (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``), which the
CLI links from the model; subclasses only say where the images are.
"""
from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets import ImageFolder

from snnet.anchors import expand_path
from snnet.determinism import (
    CALIBRATION,
    SAMPLE,
    SeededSamples,
    derive_seed,
    global_rngs_kept,
)
from snnet.errors import BadFileError
from snnet.transforms import eval_transform

TRAIN_TRANSFORMS: tuple[str, ...] = ("timm", "cifar", "eval")
DATA_ENV = "SNNET_DATA_DIR"

log = logging.getLogger(__name__)


def random_subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A fixed random subset (classes mixed: ImageFolder is sorted by class)."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"limit must be a positive number of images or null, got {limit}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:limit].tolist())


def _class_names(dataset: Dataset, classes: list[int] | None) -> list[str] | None:
    """Names of the labels 0..k-1 (``.classes`` of ImageFolder, torchvision CIFAR, the digits), or None."""
    if isinstance(dataset, ClassSubset):
        dataset = dataset.dataset
    names = getattr(dataset, "classes", None)
    if names is None:
        return None
    return [str(names[c]) for c in classes] if classes is not None else [str(n) for n in names]


def _labels(dataset: Dataset) -> list[int]:
    """Every example's label without loading images (``targets`` of ImageFolder/CIFAR, ``labels``)."""
    for attr in ("targets", "labels"):
        labels = getattr(dataset, attr, None)
        if labels is not None:
            return [int(label) for label in labels]
    raise TypeError(f"{type(dataset).__name__} exposes neither .targets nor .labels, so it cannot be filtered by class")


class ClassSubset(Dataset):
    """The examples of ``classes`` only, labels renumbered 0..k-1 in the order given (a k-class task)."""

    def __init__(self, dataset: Dataset, classes: list[int]) -> None:
        labels = _labels(dataset)
        present = sorted(set(labels))
        missing = [c for c in classes if c not in present]
        if missing:
            raise ValueError(f"classes {missing} do not occur in the data; valid class indices: {present}")
        self.dataset, self.remap = dataset, {c: i for i, c in enumerate(classes)}
        self.indices = [i for i, label in enumerate(labels) if label in self.remap]
        self.targets = [self.remap[labels[i]] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label = self.dataset[self.indices[i]]
        return image, self.remap[int(label)]


class EpochSampler(DistributedSampler):
    """This rank's share of a permutation drawn from (seed, epoch), as ``(index, sample seed)`` keys
    for :class:`~snnet.determinism.SeededSamples`, so order and augmentation are functions of
    (seed, epoch, rank, world size) only and a resumed run sees what an uninterrupted one sees.

    The starting ``epoch`` is given at construction: a loader with workers starts them, and draws
    from the sampler, as soon as its iterator is created, which Lightning does before its
    ``set_epoch``. ``skip`` drops this rank's first indices of that epoch once (resuming mid-epoch).
    Rank ``r`` of ``w`` takes every ``w``-th index from ``r`` of the permutation cut to a multiple of
    ``w``. A :class:`DistributedSampler` so that Lightning uses it as it is instead of wrapping it.
    """

    def __init__(self, length: int, seed: int, num_replicas: int = 1, rank: int = 0, epoch: int = 0, skip: int = 0) -> None:
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed, drop_last=True)
        self.length, self.epoch, self.skip = length, epoch, skip

    def __iter__(self):
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        sample_seeds = torch.randint(2**62, (self.length,), generator=torch.Generator().manual_seed(
            derive_seed(self.seed, SAMPLE, self.epoch)))
        order = order[: self.total_size][self.rank :: self.num_replicas][self.skip :]
        self.skip = 0
        return zip(order.tolist(), sample_seeds[order].tolist())


class EpochDataModule(L.LightningDataModule):
    """Loaders whose training order (and augmentation) is a function of (seed, epoch, rank) only,
    resumable mid-epoch from a checkpoint: what every snnet datamodule shares. Subclasses set
    ``train_set``/``val_set`` in ``setup``."""

    def __init__(self, batch_size: int, eval_batch_size: int | None, num_workers: int, seed: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.resume_state: dict[str, int] | None = None  # from a checkpoint, used by the next train loader
        self.class_names: list[str] | None = None  # set by setup() where the data names its classes

    # --- resuming: the same data order and augmentation from the next unseen batch ------------
    def state_dict(self) -> dict[str, Any]:
        """Where the next training batch falls (its epoch and how many of that epoch's batches are
        done) and the class names, so a server can answer with names (snnet serve)."""
        trainer = self.trainer
        if trainer is None:
            return {}
        epoch, done = trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:  # saved at the end of an epoch: the next one starts afresh
            epoch, done = epoch + 1, 0
        state: dict[str, Any] = {"epoch": int(epoch), "batches_done": int(done), "world_size": trainer.world_size}
        if self.class_names is not None:
            state["class_names"] = self.class_names
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_state = dict(state)

    def _train_sampler(self, length: int) -> EpochSampler:
        """This rank's sampler, starting at the epoch and batch a resumed run left off (once)."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        state, self.resume_state = self.resume_state, None
        if state is None:
            return EpochSampler(length, self.seed, world, rank, trainer.current_epoch if trainer is not None else 0)
        saved_world = state.get("world_size", 1)
        if saved_world != world:
            log.warning("resuming on %d processes a run saved on %d: the data split differs from the uninterrupted run's",
                        world, saved_world)
        skip = state.get("batches_done", 0) * self.batch_size * saved_world // world
        return EpochSampler(length, self.seed, world, rank, state.get("epoch", 0), skip)

    def _loader(self, train: bool) -> DataLoader:
        self.setup()
        if train:
            dataset, batch_size = SeededSamples(self.train_set), self.batch_size
            sampler = self._train_sampler(len(dataset))
        else:
            dataset, batch_size, sampler = self.val_set, self.eval_batch_size, None
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers, drop_last=train,
            pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class ImageDataModule(EpochDataModule):
    """Base: transforms from timm, loaders, subsets, and the calibration batch for least squares.

    ``train_transform``: ``timm`` (``create_transform(is_training=True, **augment)``, the ImageNet
    recipe), ``cifar`` (pad-4 random crop + flip, the CIFAR recipe) or ``eval`` (no augmentation).
    ``classes``: keep only these class indices, relabelled 0..k-1 in the given order (e.g. ``[3, 5]``
    for CIFAR-10 cat vs dog); ``None`` keeps every class.
    """

    num_classes: int

    def __init__(
        self,
        data_config: dict[str, Any] | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        train_transform: Literal["timm", "cifar", "eval"] = "timm",
        augment: dict[str, Any] | None = None,
        train_limit: int | None = None,
        val_limit: int | None = None,
        seed: int = 0,
        classes: list[int] | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed)
        if classes is not None and (len(classes) < 2 or len(set(classes)) != len(classes) or min(classes) < 0):
            raise ValueError(f"classes must be at least 2 distinct non-negative class indices or null, got {classes}")
        if train_transform not in TRAIN_TRANSFORMS:
            raise ValueError(f"unknown train_transform {train_transform!r}; choose one of {TRAIN_TRANSFORMS}")
        self.data_config = data_config
        self.train_transform = train_transform
        self.augment = augment or {}
        self.train_limit = train_limit
        self.val_limit = val_limit
        self.classes = list(classes) if classes is not None else None

    # --- what subclasses provide --------------------------------------------------------------
    def make_datasets(self, train_tf: Callable, eval_tf: Callable) -> tuple[Dataset, Dataset]:
        """(train, validation) datasets yielding ``(image, label)`` with the given transforms."""
        raise NotImplementedError

    def _datasets(self, train_tf: Callable, eval_tf: Callable) -> tuple[Dataset, Dataset]:
        """``make_datasets`` restricted to ``classes`` when set."""
        train, val = self.make_datasets(train_tf, eval_tf)
        if self.classes is None:
            return train, val
        return ClassSubset(train, self.classes), ClassSubset(val, self.classes)

    # --- transforms ---------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        if self.data_config is None:
            raise ValueError(
                "data_config is not set: the CLI links it from the model; in Python pass "
                "data_config=module.data_config (input_size, mean, std, interpolation, crop_pct)"
            )
        return self.data_config

    def transforms(self) -> tuple[Callable, Callable]:
        import torchvision.transforms as T
        from timm.data import create_transform

        cfg = self._config()
        common = {k: cfg[k] for k in ("input_size", "mean", "std", "interpolation") if k in cfg}
        eval_tf = eval_transform(cfg)
        if self.train_transform == "timm":
            train_tf = create_transform(**common, is_training=True, **self.augment)
        elif self.train_transform == "cifar":
            size = tuple(cfg["input_size"][1:])
            train_tf = T.Compose([
                T.Resize(size), T.RandomCrop(size, padding=size[0] // 8), T.RandomHorizontalFlip(),
                T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"]),
            ])
        else:
            train_tf = eval_tf
        return train_tf, eval_tf

    # --- Lightning hooks ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_tf, eval_tf = self.transforms()
        train, val = self._datasets(train_tf, eval_tf)
        self.train_set = random_subset(train, self.train_limit, self.seed)
        self.val_set = random_subset(val, self.val_limit, self.seed)
        self.class_names = _class_names(train, self.classes)

    def calibration_batch(self, n: int, augmented: bool = False) -> tuple[Tensor, Tensor]:
        """``n`` training images (a fixed random draw), un-augmented (least-squares init) or, with
        ``augmented``, through the training transform with each image's augmentation fixed by (seed,
        its position): the same images on every call, and no draw left on the global generators."""
        if n < 1:
            raise ValueError(f"calibration needs at least 1 image, got {n}")
        train_tf, eval_tf = self.transforms()
        train, _ = self._datasets(train_tf if augmented else eval_tf, eval_tf)
        subset = random_subset(train, n, self.seed + 1)
        samples, keys = subset, list(range(len(subset)))
        if augmented:  # each image's augmentation seeded by its position
            samples, keys = SeededSamples(subset), [(i, derive_seed(self.seed, CALIBRATION, i)) for i in keys]
        with global_rngs_kept():
            xs, ys = zip(*(samples[k] for k in keys))
        return torch.stack(xs), torch.as_tensor(ys)

class CheckedImageFolder(ImageFolder):
    """ImageFolder whose unreadable images (corrupt, truncated, not an image) raise a
    :class:`~snnet.errors.BadFileError` naming the file; with ``skip_unreadable`` each is
    skipped with a warning naming it (the next readable image takes its place) and counted.

    The count is one flag per image in shared memory (``torch.Tensor.share_memory_``): DataLoader
    workers, forked or spawned, set the flags of the images they skip, and the main process reads
    them all (a count kept in a Python set would stay in the worker that made it)."""

    def __init__(self, root: Path, transform: Callable, skip_unreadable: bool = False) -> None:
        super().__init__(root, transform)
        self.skip_unreadable = skip_unreadable
        self.unreadable = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    @property
    def skipped(self) -> set[str]:
        """The files skipped so far, by this process and its loader workers."""
        return {self.samples[i][0] for i in self.unreadable.nonzero().flatten().tolist()}

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.samples)):
            position = (index + offset) % len(self.samples)
            path, target = self.samples[position]
            try:
                image = self.loader(path)  # PIL decodes here: the transforms below are not guarded
            except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError, truncated data, bad headers
                reason = " ".join(str(e).split()) or type(e).__name__
                if not self.skip_unreadable:
                    raise BadFileError(f"image {path} cannot be read ({reason}); remove it, or set "
                                       "data.init_args.skip_unreadable: true to skip unreadable images") from None
                if not self.unreadable[position]:
                    self.unreadable[position] = True
                    log.warning("skipping unreadable image %s (%s)", path, reason)
                continue
            image = self.transform(image) if self.transform is not None else image
            return image, self.target_transform(target) if self.target_transform is not None else target
        raise BadFileError(f"no readable image in {self.root}")


class ImageFolderDataModule(ImageDataModule):
    """``root/<train_dir>/<class>/*.jpg`` and ``root/<val_dir>/<class>/*.jpg`` (ImageNet layout)."""

    def __init__(self, root: str, train_dir: str = "train", val_dir: str = "val", skip_unreadable: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.skip_unreadable = skip_unreadable  # off: an unreadable image stops the run, naming the file
        self.root = expand_path(root)
        self.train_dir, self.val_dir = train_dir, val_dir
        self.num_classes = len(self._classes())

    def _folder(self, name: str) -> Path:
        path = self.root / name
        if not path.is_dir():
            raise FileNotFoundError(f"image folder {path} not found (root={self.root}, expected <root>/{name}/<class>/*)")
        return path

    def _classes(self) -> list[str]:
        return sorted(d.name for d in self._folder(self.train_dir).iterdir() if d.is_dir())

    def make_datasets(self, train_tf: Callable, eval_tf: Callable) -> tuple[Dataset, Dataset]:
        return (CheckedImageFolder(self._folder(self.train_dir), train_tf, skip_unreadable=self.skip_unreadable),
                CheckedImageFolder(self._folder(self.val_dir), eval_tf, skip_unreadable=self.skip_unreadable))

    def teardown(self, stage: str) -> None:
        skipped = sorted({p for d in (self.train_set, self.val_set) for p in getattr(_base(d), "skipped", ())})
        if skipped:
            log.warning("skipped %d unreadable images (skip_unreadable: true), e.g. %s", len(skipped), ", ".join(skipped[:3]))


def _base(dataset: Dataset | None) -> Dataset | None:
    """The dataset under subsets (``torch.utils.data.Subset``, :class:`ClassSubset`)."""
    while dataset is not None and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset




def extract_cifar10_jpeg(archive: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Unpack the shared ``cifar10-jpg.tar.gz`` once (about 2 s) and return the folder holding train/ and test/."""
    if archive is None:
        data_dir = os.environ.get(DATA_ENV)
        if not data_dir:
            raise FileNotFoundError(f"set {DATA_ENV} to the folder holding cifar10-jpg.tar.gz, or pass archive=")
        archive = Path(data_dir) / "cifar10-jpg.tar.gz"
    archive = expand_path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"CIFAR-10 JPEG archive not found: {archive}")
    cache = Path(cache_dir or os.environ.get("SNNET_CACHE_DIR", "~/.cache/snnet")).expanduser()
    target = cache / "cifar10-jpg"
    done = target / ".complete"
    if not done.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        done.touch()
    roots = [p.parent for p in target.rglob("train") if (p.parent / "test").is_dir()]
    if not roots:
        raise FileNotFoundError(f"{archive} holds no train/ and test/ folders")
    return roots[0]


class CIFAR10JPEGDataModule(ImageFolderDataModule):
    """The shared CIFAR-10 JPEG archive (``$SNNET_DATA_DIR/cifar10-jpg.tar.gz``), unpacked to a cache."""

    def __init__(self, archive: str | None = None, cache_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(root=str(extract_cifar10_jpeg(archive, cache_dir)), train_dir="train", val_dir="test", **kwargs)


class TorchvisionCIFARDataModule(ImageDataModule):
    """torchvision CIFAR-10 / CIFAR-100 (``download: true`` for users with a network)."""

    VARIANTS = {"cifar10": 10, "cifar100": 100}

    def __init__(self, root: str = "~/.cache/snnet/torchvision", variant: str = "cifar10", download: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if variant not in self.VARIANTS:
            raise ValueError(f"unknown CIFAR variant {variant!r}; choose one of {tuple(self.VARIANTS)}")
        self.root, self.variant, self.download = os.path.expanduser(root), variant, download
        self.num_classes = self.VARIANTS[variant]

    def make_datasets(self, train_tf: Callable, eval_tf: Callable) -> tuple[Dataset, Dataset]:
        from torchvision import datasets

        cls = datasets.CIFAR10 if self.variant == "cifar10" else datasets.CIFAR100
        return (cls(self.root, train=True, transform=train_tf, download=self.download),
                cls(self.root, train=False, transform=eval_tf, download=self.download))


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits (ships with scikit-learn: no download) as RGB PIL images."""

    classes: tuple[str, ...] = tuple(str(d) for d in range(10))

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = Image.fromarray(self.images[i]).convert("RGB")
        return self.transform(image), int(self.labels[i])


def distort_digits(images: np.ndarray, strength: float, copies: int, seed: int, size: int = 16) -> np.ndarray:
    """``copies`` fixed random affine + noise views of each 8x8 digit (float 0..16), as ``size`` px uint8.

    Why: undistorted digits are so easy that a ResNet-8 matches a ResNet-56, and a family whose
    anchors are equally accurate cannot show stitches between them. At ``strength`` 1: rotation up to
    45 degrees, scale 0.75-1.25, shift up to 1/8 of the image, Gaussian pixel noise of std 0.3.
    Returns ``(copies * len(images), size, size)``, copy-major; deterministic in ``seed``.
    """
    x = torch.from_numpy(images).to(torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).repeat(copies, 1, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * strength * torch.pi / 4
    scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * strength * 0.25
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * strength * 0.25
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    x = x + strength * 0.3 * torch.randn(x.shape, generator=gen)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).numpy()


class DigitsDataModule(ImageDataModule):
    """The offline quickstart data: 1,797 digits, a fixed 80/20 split, upsampled by the transform.

    ``distortion`` > 0 makes a harder task, where capacity shows (:func:`distort_digits`):
    ``copies`` fixed distorted views of every digit, train and validation alike (a digit's views stay
    on its side of the split).
    """

    num_classes = 10

    def __init__(
        self,
        val_fraction: float = 0.2,
        distortion: float = 0.0,
        copies: int = 1,
        train_transform: Literal["timm", "cifar", "eval"] = "eval",
        **kwargs: Any,
    ) -> None:
        # "eval" by default: flips and crops change what a digit means.
        super().__init__(train_transform=train_transform, **kwargs)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if not 0.0 <= distortion <= 1.0:
            raise ValueError(f"distortion must be in [0, 1], got {distortion}")
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        self.val_fraction, self.distortion, self.copies = val_fraction, distortion, copies

    def make_datasets(self, train_tf: Callable, eval_tf: Callable) -> tuple[Dataset, Dataset]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = torch.randperm(len(digits.images), generator=torch.Generator().manual_seed(1234)).numpy()
        n_val = int(round(len(order) * self.val_fraction))
        splits = []
        for part, seed in ((order[n_val:], 1), (order[:n_val], 2)):
            if self.distortion > 0:
                images = distort_digits(digits.images[part], self.distortion, self.copies, seed)
            else:
                images = np.round(digits.images[part] * (255.0 / 16.0)).astype(np.uint8)
                images = np.tile(images, (self.copies, 1, 1))
            splits.append((images, np.tile(digits.target[part], self.copies)))
        (train_x, train_y), (val_x, val_y) = splits
        return DigitsDataset(train_x, train_y, train_tf), DigitsDataset(val_x, val_y, eval_tf)

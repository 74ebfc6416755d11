"""Stitching as a similarity measure: sender-layer x receiver-layer matrices of linear CKA,
stitched accuracy and stitching penalty (Bansal et al. 2021; arXiv 2303.11277), with files,
heatmaps and W&B logging, and the ``snnet similarity`` run behind them.

Layers are the points of :mod:`snnet.general_stitching.module` on both axes: rows are the sender's points
0..n (stem output, then every block's output), columns the receiver's points 0..m (the input of
block q; m = the input of the head). The stitching penalty is the stitched model's error minus the
receiver's own error, in percentage points (Bansal et al.'s definition).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

import lightning as L
import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from snnet.cka import MinibatchCKA, cka_matrix
from snnet.data import ImageDataModule, random_subset
from snnet.families import AnchorView, anchor_view
from snnet.general_stitching.adapters import (
    AdapterConfig,
    check_adapter_name,
    init_lstsq,
)
from snnet.general_stitching.module import (
    AdapterModule,
    AdapterOptimConfig,
    ModelSpec,
    StitchedModel,
    adapter_between,
    check_point,
    model_name,
    num_points,
    profile_pair,
    run_blocks,
    stitch_input_size,
)

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser

PAIR_SETS: tuple[str, ...] = ("all", "stages", "diagonal", "stages+diagonal")
MEASURES: tuple[str, ...] = ("cka", "stitching", "both")


# --- the result: one matrix over sender x receiver points -------------------------------------
@dataclass
class Grid:
    """``values[p, q]`` (float64, NaN where not measured) for sender point p and receiver point q."""

    measure: str  # "cka", "stitched_accuracy" or "stitching_penalty"
    sender: str
    receiver: str
    values: Tensor
    sender_boundaries: list[int]  # points where the sender's stages begin/end (0, ..., n)
    receiver_boundaries: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    def measured(self) -> list[tuple[int, int, float]]:
        """(p, q, value) for every measured cell, row by row."""
        cells = torch.nonzero(~torch.isnan(self.values)).tolist()
        return [(p, q, float(self.values[p, q])) for p, q in cells]

    def to_dict(self) -> dict[str, Any]:
        rows = [[None if math.isnan(v) else v for v in row] for row in self.values.tolist()]
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "values"} | {"values": rows}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Grid":
        values = torch.tensor([[math.nan if v is None else v for v in row] for row in d["values"]], dtype=torch.float64)
        return cls(**{**d, "values": values})


def save_grid(grid: Grid, json_path: str | os.PathLike, csv_path: str | os.PathLike | None = None) -> None:
    """The whole grid as JSON; the measured cells as CSV rows (sender_layer, receiver_layer, relative depths, value)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(grid.to_dict(), indent=1))
    if csv_path is None:
        return
    n, m = grid.values.shape[0] - 1, grid.values.shape[1] - 1
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sender_layer", "receiver_layer", "sender_depth", "receiver_depth", grid.measure])
        for p, q, v in grid.measured():
            writer.writerow([p, q, round(p / max(n, 1), 4), round(q / max(m, 1), 4), v])


def load_grid(path: str | os.PathLike) -> Grid:
    return Grid.from_dict(json.loads(Path(path).read_text()))


_SCALES: dict[str, tuple[str, float | None, float | None, str]] = {  # colormap, vmin, vmax, label format
    "cka": ("viridis", 0.0, 1.0, "{:.2f}"),
    "stitched_accuracy": ("viridis", 0.0, 100.0, "{:.0f}"),
    "stitching_penalty": ("magma_r", 0.0, None, "{:.0f}"),
}


def plot_heatmap(grid: Grid, path: str | os.PathLike, title: str | None = None, annotate: bool | None = None) -> Path:
    """Heatmap PNG: sender layers down, receiver layers across; unmeasured cells blank; the dashed
    line is equal relative depth (p/n = q/m); dotted lines mark stage boundaries. Values are written
    in the cells when there are few measured cells (``annotate=None``: at most 120)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = grid.values.numpy()
    rows, cols = values.shape
    cmap, vmin, vmax, fmt = _SCALES.get(grid.measure, ("viridis", None, None, "{:.2g}"))
    measured = grid.measured()
    annotate = len(measured) <= 120 if annotate is None else annotate
    fig, ax = plt.subplots(figsize=(3.4 + 0.3 * cols, 2.4 + 0.3 * rows))
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_facecolor("#eeeeee")
    ax.plot([0, cols - 1], [0, rows - 1], "--", color="white", lw=1.0, alpha=0.8)
    for b in grid.sender_boundaries[1:-1]:
        ax.axhline(b, color="white", lw=0.6, ls=":", alpha=0.7)
    for b in grid.receiver_boundaries[1:-1]:
        ax.axvline(b, color="white", lw=0.6, ls=":", alpha=0.7)
    if annotate:
        norm = image.norm
        for p, q, v in measured:
            dark = norm(v) < 0.5 if cmap == "viridis" else norm(v) > 0.5
            ax.text(q, p, fmt.format(v), ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(0, cols, max(1, cols // 15)))
    ax.set_yticks(range(0, rows, max(1, rows // 15)))
    ax.set_xlabel(f"receiver {grid.receiver}: layer q")
    ax.set_ylabel(f"sender {grid.sender}: layer p")
    ax.set_title(title or f"{grid.measure.replace('_', ' ')}: {grid.sender} -> {grid.receiver}", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_to_wandb(items: Sequence[tuple[Grid, Path]]) -> bool:
    """Log each heatmap and its measured cells (a table) to the active W&B run; False when there is none."""
    import wandb

    if wandb.run is None:
        return False
    for grid, png in items:
        key = grid.measure + (f"_{grid.meta['adapter']['name']}" if "adapter" in grid.meta else "")
        table = wandb.Table(columns=["sender_layer", "receiver_layer", grid.measure], data=[list(c) for c in grid.measured()])
        wandb.log({f"similarity/{key}": wandb.Image(str(png)), f"similarity/{key}_table": table})
    return True


# --- which layer pairs ---------------------------------------------------------------------------
def stage_boundaries(view: AnchorView) -> list[int]:
    """Points at which stages begin or end: 0, then the cumulative stage depths."""
    return [0, *accumulate(view.stage_depths)]


def select_pairs(
    sender: AnchorView, receiver: AnchorView, which: str | Sequence[Sequence[int]] = "stages+diagonal", band: int = 0
) -> list[tuple[int, int]]:
    """(sender point, receiver point) pairs, sorted.

    ``"all"``: every pair. ``"stages"``: stage boundaries x stage boundaries. ``"diagonal"``: equal
    relative depth, one pair per point of the model with fewer points (its partner is the nearest
    point at the same fraction of the other model's depth), widened by ``band`` points of the
    longer model on each side. ``"stages+diagonal"``: both. Or an explicit list of pairs, each
    checked against the valid range.
    """
    n, m = num_points(sender) - 1, num_points(receiver) - 1
    if not isinstance(which, str):
        return sorted({(check_point(sender, p, "sender"), check_point(receiver, q, "receiver")) for p, q in which})
    if which not in PAIR_SETS:
        raise ValueError(f"unknown pair set {which!r}; choose one of {PAIR_SETS} or give a list of [sender, receiver] layers")
    if band < 0:
        raise ValueError(f"band must be >= 0, got {band}")
    pairs: set[tuple[int, int]] = set()
    if which == "all":
        pairs = {(p, q) for p in range(n + 1) for q in range(m + 1)}
    if "stages" in which:
        pairs |= {(p, q) for p in stage_boundaries(sender) for q in stage_boundaries(receiver)}
    if "diagonal" in which:
        short, long = (n, m) if n <= m else (m, n)
        for i in range(short + 1):
            centre = round(i * long / max(short, 1))
            for j in range(max(0, centre - band), min(long, centre + band) + 1):
                pairs.add((i, j) if n <= m else (j, i))
    return sorted(pairs)


# --- features ------------------------------------------------------------------------------------
def _pool(h: Tensor, layout: str, pool: str) -> Tensor:
    if pool == "flatten" or layout == "vector":  # a vector has no positions to average over
        return h.flatten(1)
    return h.mean(dim=(2, 3) if layout == "nchw" else (1, 2) if layout == "nhwc" else 1)


@torch.no_grad()
def point_features(view: AnchorView, x: Tensor, pool: Literal["flatten", "mean"] = "flatten") -> list[Tensor]:
    """(B, d) features at every point: the stem output, then every block's output.

    ``flatten``: every (position, channel) is a feature (Kornblith et al.); ``mean``: averaged over
    positions (tokens or the spatial grid), one feature per channel.
    """
    if pool not in ("flatten", "mean"):
        raise ValueError(f"unknown pool {pool!r}; choose 'flatten' or 'mean'")
    h = view.stem(x)
    feats = [_pool(h, view.layout_at(0)[0], pool)]
    for p, block in enumerate(view.blocks, start=1):
        h = block(h)
        feats.append(_pool(h, view.layout_at(p)[0], pool))
    return feats


@torch.no_grad()
def cka_grid(
    sender: nn.Module,
    receiver: nn.Module,
    images: Tensor,
    batch_size: int = 250,
    estimator: Literal["minibatch", "full"] = "minibatch",
    pool: Literal["flatten", "mean"] = "flatten",
) -> Grid:
    """Linear CKA between every sender point and every receiver point on ``images``.

    ``minibatch`` (default): Nguyen et al.'s estimator (:class:`~snnet.cka.MinibatchCKA`, unbiased
    HSIC averaged over batches of ``batch_size``), memory independent of the number of images.
    ``full``: :func:`~snnet.cka.cka_matrix` on all images at once (the biased full-batch CKA; holds
    every point's features for all images). Models are put in eval mode.
    """
    if estimator not in ("minibatch", "full"):
        raise ValueError(f"unknown CKA estimator {estimator!r}; choose 'minibatch' or 'full'")
    began = time.perf_counter()
    sender.eval()
    receiver.eval()
    sv, rv = anchor_view(sender), anchor_view(receiver)
    batches = images.tensor_split(max(1, math.ceil(len(images) / batch_size)))  # near-equal: none too small
    minibatch = MinibatchCKA()
    xs: list[list[Tensor]] = []
    ys: list[list[Tensor]] = []
    for x in tqdm(batches, desc="CKA", unit="batch", leave=False):
        fx, fy = point_features(sv, x, pool), point_features(rv, x, pool)
        if estimator == "minibatch":
            minibatch.update(fx, fy)
        else:
            xs.append(fx)
            ys.append(fy)
    if estimator == "minibatch":
        values = minibatch.compute()
    else:
        values = cka_matrix([torch.cat(f) for f in zip(*xs)], [torch.cat(f) for f in zip(*ys)])
    meta = {"images": len(images), "batch_size": batch_size, "estimator": estimator, "pool": pool,
            "seconds": round(time.perf_counter() - began, 1)}
    return Grid("cka", model_name(sender), model_name(receiver), values.cpu(), stage_boundaries(sv), stage_boundaries(rv), meta)


# --- stitching -------------------------------------------------------------------------------------
@torch.no_grad()
def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([fn(chunk) for chunk in x.split(batch_size)])


@torch.no_grad()
def accuracy(fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of ``fn`` (inputs -> logits) on ``x``, batched; one sync at the end."""
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        correct += (fn(xb).argmax(dim=-1) == yb).sum()
    return 100.0 * int(correct) / len(y)


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit banners and the expected 'modules in eval mode' warning (the frozen
    models), so one progress bar over the pairs stays readable."""
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
            warnings.filterwarnings("ignore", message=r".*no `val_dataloader`.*")
            yield
    finally:
        lightning_log.setLevel(level)


def _trainer(steps: int, device: torch.device) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )


def stitching_grid(
    sender: nn.Module,
    receiver: nn.Module,
    pairs: Sequence[tuple[int, int]],
    adapters: Sequence[AdapterConfig],
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    steps: int = 100,
    batch_size: int = 64,
    optim: AdapterOptimConfig = AdapterOptimConfig(),
    ls_images: int = 500,
    seed: int = 0,
    input_size: tuple[int, int, int] | None = None,
) -> list[tuple[Grid, Grid]]:
    """Stitched accuracy and stitching penalty (both in %) per adapter, for every layer pair.

    Per pair and adapter: a fresh adapter, least-squares init of its linear path on the first
    ``ls_images`` training images (when it has one and ``ls_images > 0``), then ``steps`` AdamW
    steps of ``batch_size`` (a Lightning fit of :class:`~snnet.general_stitching.module.AdapterModule`; ``steps=0``
    keeps the init), then top-1 on ``test``. ``train`` and ``test`` are (images, labels) tensors,
    used un-augmented. The frozen sender's activations are computed once per sender layer for all
    pairs and adapters (walking the sender layer by layer: one layer's activations for all images
    are in memory at a time). Returns one (accuracy, penalty) pair of grids per adapter.
    """
    for adapter in adapters:
        check_adapter_name(adapter.name)
    began = time.perf_counter()
    sv, rv = anchor_view(sender), anchor_view(receiver)
    pairs = select_pairs(sv, rv, pairs)
    sender.eval()
    receiver.eval()
    profiles = profile_pair(sender, receiver, input_size)
    device = next(sender.parameters()).device
    (x_train, y_train), (x_test, y_test) = [tuple(t.to(device) for t in pair) for pair in (train, test)]
    if ls_images > len(x_train):
        raise ValueError(f"ls_images={ls_images} exceeds the {len(x_train)} training images")
    receiver_acc = accuracy(receiver, x_test, y_test)
    shape = (num_points(sv), num_points(rv))
    acc = [torch.full(shape, math.nan, dtype=torch.float64) for _ in adapters]
    seconds: list[dict[str, float]] = [{} for _ in adapters]
    init_acc: list[dict[str, float]] = [{} for _ in adapters]  # after least squares, before training
    h_train, h_test = _batched(sv.stem, x_train, 500), _batched(sv.stem, x_test, 500)
    point = 0
    bar = tqdm([(p, q, a) for p, q in pairs for a in range(len(adapters))], desc="stitching", unit="fit")
    with _quiet_lightning():
        for p, q, a in bar:
            if p != point:  # advance the cached sender activations to point p
                h_train, h_test = (_batched(lambda h: run_blocks(sv, h, point, p), h, 500) for h in (h_train, h_test))
                point = p
            start = time.perf_counter()
            L.seed_everything(seed, verbose=False)
            model = StitchedModel(sender, p, receiver, q, adapter_between(sender, p, receiver, q, adapters[a], profiles))
            if model.adapter.lstsq_ready and ls_images > 0:
                init_lstsq(model.adapter, h_train[:ls_images], _batched(model.receiver_features, x_train[:ls_images], 500))
                init_acc[a][f"{p},{q}"] = accuracy(model.eval().from_sender, h_test, y_test)
            if steps > 0:
                loader = DataLoader(TensorDataset(h_train, y_train), batch_size=batch_size, shuffle=True, drop_last=True,
                                    generator=torch.Generator().manual_seed(seed))
                _trainer(steps, device).fit(AdapterModule(model, optim, inputs="sender_features"), loader)
            acc[a][p, q] = accuracy(model.eval().from_sender, h_test, y_test)
            seconds[a][f"{p},{q}"] = round(time.perf_counter() - start, 2)
            bar.set_postfix_str(f"{adapters[a].name} {p}->{q}: {acc[a][p, q]:.1f}%")
    names = model_name(sender), model_name(receiver)
    bounds = stage_boundaries(sv), stage_boundaries(rv)
    grids = []
    for a, adapter in enumerate(adapters):
        meta = {
            "adapter": asdict(adapter), "steps": steps, "batch_size": batch_size, "train_images": len(x_train),
            "test_images": len(x_test), "ls_images": ls_images if init_acc[a] else 0, "optim": asdict(optim),
            "seed": seed, "receiver_accuracy": receiver_acc, "init_accuracy": init_acc[a], "seconds": seconds[a],
            "total_seconds_all_adapters": round(time.perf_counter() - began, 1),
        }
        grids.append((Grid("stitched_accuracy", *names, acc[a], *bounds, meta),
                      Grid("stitching_penalty", *names, receiver_acc - acc[a], *bounds, meta)))
    return grids


# --- the `snnet similarity` run --------------------------------------------------------------------
@dataclass
class CkaGridConfig:
    images: int = 1000  # test images (the first of the data's validation subset)
    batch_size: int = 250
    estimator: Literal["minibatch", "full"] = "minibatch"
    pool: Literal["flatten", "mean"] = "flatten"


@dataclass
class StitchGridConfig:
    """One stitching grid per adapter; ``train_images`` defaults to ``steps * batch_size`` (one pass)."""

    adapters: list[AdapterConfig] = field(default_factory=lambda: [AdapterConfig()])
    pairs: str | list[tuple[int, int]] = "stages+diagonal"
    band: int = 0
    steps: int = 100
    batch_size: int = 64
    train_images: int | None = None
    test_images: int = 2000
    ls_images: int = 500
    optim: AdapterOptimConfig = field(default_factory=AdapterOptimConfig)
    seed: int = 0


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "snnet"
    mode: Literal["offline", "online", "disabled"] = "offline"
    name: str | None = None


@dataclass
class SimilarityConfig:
    """What ``snnet similarity --config`` computes (the ``data`` section is a DataModule class_path)."""

    sender: ModelSpec
    receiver: ModelSpec
    measure: Literal["cka", "stitching", "both"] = "both"
    input_size: tuple[int, int, int] | None = None
    cka: CkaGridConfig = field(default_factory=CkaGridConfig)
    stitching: StitchGridConfig = field(default_factory=StitchGridConfig)
    out_dir: str = "outputs/similarity"
    wandb: WandbConfig = field(default_factory=WandbConfig)


def similarity_parser() -> "ArgumentParser":
    """jsonargparse parser of the YAML: the :class:`SimilarityConfig` keys at the root plus ``data``."""
    from jsonargparse import ActionConfigFile

    from snnet.arguments import new_parser

    parser = new_parser("snnet similarity", "CKA and stitching matrices between the layers of two models.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with sender, receiver, measure, cka, stitching, data, ...")
    parser.add_class_arguments(SimilarityConfig, None)
    parser.add_subclass_arguments(ImageDataModule, "data", skip={"data_config"}, required=True)
    return parser


def parse_similarity(argv: Sequence[str]) -> tuple[SimilarityConfig, ImageDataModule]:
    """(config, datamodule) from command-line arguments (``--config`` file plus overrides)."""
    from snnet.arguments import parse

    parser = similarity_parser()
    init = parser.instantiate(parse(parser, argv))
    config = SimilarityConfig(**{f.name: init[f.name] for f in fields(SimilarityConfig)})
    return config, init["data"]


def load_images(dataset: Dataset, limit: int, seed: int = 0, batch_size: int = 250) -> tuple[Tensor, Tensor]:
    """``limit`` images (a fixed random draw, classes mixed) and labels as two tensors."""
    subset = random_subset(dataset, limit, seed)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False)
    xs, ys = zip(*tqdm(loader, desc="loading images", unit="batch", leave=False))
    return torch.cat(xs), torch.cat(ys)


def _labels(config: SimilarityConfig) -> list[str]:
    """A file label per adapter: its name, plus its position when names repeat."""
    names = [a.name for a in config.stitching.adapters]
    return [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]


def run_similarity(config: SimilarityConfig, data: ImageDataModule) -> list[Path]:
    """Compute the configured matrices; write ``<out_dir>/<measure>[_<adapter>].{json,csv,png}``
    and log them to W&B when enabled. Returns the written paths."""
    from timm.data import resolve_data_config

    if config.measure not in MEASURES:
        raise ValueError(f"unknown measure {config.measure!r}; choose one of {MEASURES}")
    for a in config.stitching.adapters:
        check_adapter_name(a.name)
    sender, receiver = config.sender.create().eval(), config.receiver.create().eval()
    sv, rv = anchor_view(sender), anchor_view(receiver)
    stitch = config.stitching
    pairs = select_pairs(sv, rv, stitch.pairs, stitch.band)  # bad layers fail before any work
    data.data_config = {**resolve_data_config(model=sender), "input_size": stitch_input_size(sender, config.input_size)}
    data.setup()
    want_cka, want_stitching = config.measure in ("cka", "both"), config.measure in ("stitching", "both")
    n_test = max(config.cka.images if want_cka else 0, stitch.test_images if want_stitching else 0)
    x_test, y_test = load_images(data.val_set, n_test, data.seed)
    results: list[tuple[Grid, str]] = []
    if want_cka:
        grid = cka_grid(sender, receiver, x_test[: config.cka.images], config.cka.batch_size, config.cka.estimator, config.cka.pool)
        results.append((grid, "cka"))
    if want_stitching:
        train = data.calibration_batch(stitch.train_images or stitch.steps * stitch.batch_size)
        test = (x_test[: stitch.test_images], y_test[: stitch.test_images])
        grids = stitching_grid(
            sender, receiver, pairs, stitch.adapters, train, test, stitch.steps, stitch.batch_size, stitch.optim,
            min(stitch.ls_images, len(train[0])), stitch.seed, config.input_size,
        )
        for (acc, penalty), label in zip(grids, _labels(config)):
            results += [(acc, f"stitched_accuracy_{label}"), (penalty, f"stitching_penalty_{label}")]
    out = Path(config.out_dir)
    written: list[Path] = []
    logged: list[tuple[Grid, Path]] = []
    for grid, stem in results:
        save_grid(grid, out / f"{stem}.json", out / f"{stem}.csv")
        png = plot_heatmap(grid, out / f"{stem}.png")
        written += [out / f"{stem}.json", out / f"{stem}.csv", png]
        logged.append((grid, png))
    if config.wandb.enabled:
        import wandb

        with wandb.init(project=config.wandb.project, mode=config.wandb.mode, name=config.wandb.name,
                        config=asdict(config), dir=str(out)):
            log_to_wandb(logged)
    return written

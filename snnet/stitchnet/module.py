"""StitchNet (Teerapittayanon et al. 2023, arXiv 2301.01947): compose a network from pretrained
fragments with no backpropagation, guided by CKA; and its zero-epoch LightningModule.

Algorithm 1 of the paper, as implemented by :func:`compose`:

1. Every fragment that takes the input starts a partial network (score 1).
2. A partial network is extended by the fragments not yet on it, ranked by the linear CKA between
   its current output and the activations each candidate normally receives (its own network's
   activation at that point, on the same samples). Activations are compared with spatial positions
   as samples and channels as features, after bringing the current output onto the candidate's
   grid -- a random subset (``cka_rows``) of the very rows the bridge is fitted on (as the paper's
   code does, resizing instead of flattening); only the sampled rows are interpolated
   (:meth:`~snnet.stitching.StitchingLayer.fit_rows_at`), not whole maps. At most ``span`` (K)
   candidates are kept per step, and only those whose score --
   the product of CKAs along the path -- stays above ``threshold`` (T; the paper's code prunes on
   this product, ``totalThreshold``, which also drops any single step below T).
3. A fragment that produces the output finishes a network; more than ``max_fragments`` fragments
   is a dead end.

Bridges: the next fragment's own predecessor is connected directly (it receives what it was
trained on); any other fragment gets a least-squares affine map (1x1 conv / linear, float64 normal
equations) from the current output to the activations it normally receives, after token<->map
conversion and bilinear resize (:class:`~snnet.stitching.StitchingLayer`), fitted on the same
samples. ``fuse=True`` folds the bridge into the next fragment's first Conv2d / Linear where there
is one (layer granularity; residual blocks use their input twice, so nothing can be folded into
them); a padded conv gets an exact position-dependent bias map for the bridge's bias.

Where we depart from the paper, and why:

* Search order is best-first (highest score first) instead of depth-first. The tree -- and so
  the set of networks once it is exhausted (``max_networks: null``) -- is the same; the order
  matters only under the cap ``max_networks`` (ours; the paper has none), which then keeps the
  highest-scoring networks instead of the first ones one branch of the DFS reaches. With residual
  CIFAR pools the full tree has thousands of leaves (neighbouring blocks' inputs have CKA ~0.9),
  so a cap is needed.
* No SGD clean-up of the bridges after the least-squares fit (the paper's code runs one epoch at
  lr 1e-6): composition stays backpropagation-free.
* New tasks get a closed-form head (:mod:`snnet.stitchnet.heads`, ridge by default) instead of KNN on
  the 1000-d outputs.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch.nn as nn
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from snnet.config import as_config
from snnet.results import StitchResult
from snnet.stitchnet.composition import (
    Composition,
    compose,
    print_candidates,
    save_candidates,
)
from snnet.stitchnet.fragments import (
    FragmentPool,
    Granularity,
    build_fragment_pool,
)
from snnet.stitchnet.search import ComposeConfig

log = logging.getLogger(__name__)


@dataclass
class PoolConfig:
    """Which pretrained networks to cut: timm names, hub weights or local checkpoints (one per model)."""

    models: list[str]
    checkpoints: list[str | None] | None = None
    pretrained: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    granularity: Granularity = "block"
    input_size: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("pool.models is empty: list at least one timm model name")
        if self.checkpoints and len(self.checkpoints) != len(self.models):
            raise ValueError(f"pool.checkpoints has {len(self.checkpoints)} entries for {len(self.models)} models {self.models}")


def build_pool(cfg: PoolConfig) -> FragmentPool:
    from snnet.anchors import create_anchor

    checkpoints = cfg.checkpoints or [None] * len(cfg.models)
    models = {
        name: create_anchor(name, pretrained=cfg.pretrained and ckpt is None, checkpoint=ckpt, **cfg.model_kwargs)
        for name, ckpt in zip(cfg.models, checkpoints)
    }
    return build_fragment_pool(models, cfg.granularity, cfg.input_size)


class StitchNetModule(L.LightningModule):
    """StitchNet as a zero-epoch Lightning run (``trainer.max_epochs: 0``): the networks are
    composed in ``setup`` from ``samples`` un-augmented training images of the datamodule (its
    ``classes`` subset, if any, is the task), with no optimizer; validation scores every candidate
    and reports them ranked by CKA score (``results`` for :class:`~snnet.callbacks.StitchReport`,
    plus ``stitchnet_candidates.json`` with fragments, CKAs and bridges)."""

    def __init__(self, pool: PoolConfig, compose: ComposeConfig = ComposeConfig(), samples: int = 32,
                 cache: bool = True, out_dir: str | None = None) -> None:
        super().__init__()
        self.pool_cfg, self.compose_cfg = as_config(PoolConfig, pool), as_config(ComposeConfig, compose)
        if samples < 2:
            raise ValueError(f"samples must be >= 2 (CKA and the bridges are fitted on them), got {samples}")
        self.samples, self.cache, self.out_dir = samples, cache, out_dir
        self.save_hyperparameters({"pool": asdict(self.pool_cfg), "compose": asdict(self.compose_cfg), "samples": samples,
                                   "cache": cache, "out_dir": out_dir})
        self.pool = build_pool(self.pool_cfg)
        self.pool_models = nn.ModuleDict(self.pool.models)
        self.composition: Composition | None = None
        self.val_acc1 = nn.ModuleList()
        self.val_acc5 = nn.ModuleList()
        self.results: list[StitchResult] = []

    @property
    def data_config(self) -> dict[str, Any]:
        """timm data config of the first pool model, sized to the pool's input, for the datamodule."""
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=next(iter(self.pool.models.values())))
        cfg["input_size"] = self.pool.input_size
        return cfg

    def setup(self, stage: str) -> None:
        if self.composition is not None:
            return
        if stage == "fit" and self.trainer.max_epochs != 0:
            raise ValueError(f"StitchNet composes without training: set trainer.max_epochs: 0 (got {self.trainer.max_epochs})")
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "calibration_batch"):
            raise RuntimeError("StitchNet needs a datamodule with calibration_batch(n) for its samples")
        x, y = dm.calibration_batch(self.samples)
        classes = getattr(dm, "classes", None)
        device = self.trainer.strategy.root_device
        self.to(device)
        self.composition = compose(self.pool, x.to(device), y.to(device), self.compose_cfg, classes=classes,
                                   num_classes=None if classes else dm.num_classes, cache=self.cache)
        k = self.composition.num_classes
        self.val_acc1 = nn.ModuleList(MulticlassAccuracy(k, top_k=1, average="micro") for _ in self.composition.candidates)
        self.val_acc5 = nn.ModuleList(MulticlassAccuracy(k, top_k=min(5, k), average="micro") for _ in self.composition.candidates)
        self.results = self.composition.results()
        if self.trainer.global_rank == 0:
            print_candidates(self.composition)
        self._save(None)

    def forward(self, x: Tensor, candidate: int = 0) -> Tensor:
        return self.composition(x, candidate)

    def configure_optimizers(self) -> None:
        return None  # nothing is trained

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """Never runs with ``max_epochs: 0``; Lightning only requires that it exists."""
        raise RuntimeError("StitchNet composes without training: run with trainer.max_epochs: 0")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        for i, logits in self.composition.forward_many(x).items():
            self.val_acc1[i].update(logits, y)
            self.val_acc5[i].update(logits, y)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for metric in [*self.val_acc1, *self.val_acc5]:
                metric.reset()
            return
        for c, a1, a5 in zip(self.composition.candidates, self.val_acc1, self.val_acc5):
            c.acc1, c.acc5 = float(a1.compute()) * 100, float(a5.compute()) * 100
            a1.reset()
            a5.reset()
        self.results = self.composition.results()
        stage = "test" if self.trainer.state.fn == "test" else "val"
        self.log_dict({f"{stage}/acc1_candidate_{c.id:03d}": c.acc1 for c in self.composition.candidates})
        if self.trainer.global_rank == 0:
            print_candidates(self.composition)
        self._save(stage)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def _save(self, stage: str | None) -> None:
        if self.trainer.global_rank != 0:
            return
        root = Path(self.out_dir or self.trainer.log_dir or self.trainer.default_root_dir)
        name = f"{stage}_stitchnet_candidates.json" if stage else "stitchnet_candidates.json"
        path = save_candidates(self.composition, root / name, {"samples": self.samples})
        log.info("StitchNet candidates written to %s", path)

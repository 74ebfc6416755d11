"""The SN-Net LightningModule: joint training of all stitches with distillation.

Each step trains one configuration, drawn from (seed, global step) so that every DDP rank and a
resumed run agree. Validation scores a chosen subset of configurations per epoch.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning as L
import torch
import torch.nn as nn
from torch import Tensor
from lightning.pytorch.utilities import rank_zero_warn

from snnet.anchors import create_anchor
from snnet.checkpoint_io import check_fits
from snnet.config import as_config
from snnet.determinism import STEP, derive_seed, seed_global_rngs
from snnet.front import FrontFigures, front_figures, stitch_result
from snnet.lstsq import StitchInitConfig
from snnet.optim import SCHEDULE_KEY, decay_groups, schedule_change, warmup_cosine
from snnet.profiling import count_flops, unfused_attention
from snnet.results import StitchResult
from snnet.sn_net.build import NetworkConfig, build_network
from snnet.sn_net.choice import StitchChoice
from snnet.sn_net.compile import compile_stitchable
from snnet.sn_net.sampling import sample_stitch, sampling_weights, with_anchor_share
from snnet.sn_net.task import task_for

log = logging.getLogger(__name__)


OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")


@dataclass
class OptimConfig:
    """AdamW (or SGD with momentum) with linear warmup then cosine decay, stepped per batch.

    Anchors get ``lr * anchor_lr_scale`` (SN-Net's Swin recipe uses 0.1); norms and biases get no
    weight decay. ``freeze_anchors``: anchor-preserving training: the anchors get no gradient, no
    optimizer state and eval-mode BatchNorm, so they end bit-identical to the pretrained ones; only
    the stitching layers train and training steps draw stitches only (an anchor step would train nothing).
    ``min_lr`` is the cosine floor for ``lr``; every group's floor scales with its own lr.
    ``bn_stats``: which training steps run the anchors' BatchNorm in train mode (batch statistics,
    running statistics updated). ``all_steps`` (SN-Net as published); ``anchor_steps``: a stitch's
    step runs them in eval mode, so the running statistics stay the anchor's own (a stitched input,
    whose statistics differ, would otherwise overwrite them; the end anchor, shared by most stitches,
    degrades most) and the stitch trains with the normalisation it is evaluated with.
    """

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.05
    anchor_lr_scale: float = 1.0
    warmup_steps: int = 0
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    freeze_anchors: bool = False
    bn_stats: Literal["all_steps", "anchor_steps"] = "all_steps"


BN_STATS: tuple[str, ...] = ("all_steps", "anchor_steps")


@dataclass
class DistillConfig:
    """Knowledge distillation: ``(1 - alpha) * CE + alpha * KD``.

    ``teacher``: ``"largest_anchor"`` (a frozen copy of the slowest anchor), a timm model name, or
    null for none. ``kind``: ``hard`` (CE to the teacher's argmax, as SN-Net) or ``soft`` (KL with
    ``temperature``).
    """

    teacher: str | None = None
    checkpoint: str | None = None
    pretrained: bool = True  # hub weights for a teacher given by timm name (ignored with a checkpoint)
    kind: Literal["hard", "soft"] = "hard"
    alpha: float = 0.5
    temperature: float = 1.0


@dataclass
class LossConfig:
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0


@dataclass
class BatchNormCalibrationConfig:
    """Per-path BatchNorm statistics (:mod:`snnet.sn_net.batchnorm`), re-estimated before every validation
    on ``images`` training images, ``batch_size`` at a time, and kept in the checkpoint
    for validate, serve and export. 0 turns it off: every path then evaluates with the layers' shared
    running statistics, as SN-Net published. Families without BatchNorm (ViT, Swin) skip it.
    ``augmented``: the images go through the training transform (fixed per image), as the
    statistics training normalised with were of augmented batches (``update_bn`` over the training
    loader does the same); ``false``: the evaluation transform."""

    images: int = 1000
    batch_size: int = 100
    augmented: bool = True


def set_batchnorm_training(module: nn.Module, mode: bool) -> None:
    """Put only the BatchNorm layers of ``module`` in train (``True``) or eval mode."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(mode)


class SNNetModule(L.LightningModule):
    """Trains a :class:`~snnet.sn_net.network.StitchableNetwork` (one stitch per step) and scores every stitch."""

    def __init__(
        self,
        network: NetworkConfig,
        optim: OptimConfig = OptimConfig(),
        distill: DistillConfig = DistillConfig(),
        loss: LossConfig = LossConfig(),
        stitch_init: StitchInitConfig = StitchInitConfig(),
        bn_calibration: BatchNormCalibrationConfig = BatchNormCalibrationConfig(),
        sampling: Literal["uniform", "flops"] = "uniform",
        sampling_groups: int = 10,
        anchor_share: float | None = None,
        eval_stitches: Literal["all", "anchors"] | int = "all",
        seed: int = 0,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
        predict: StitchChoice = StitchChoice(),
    ) -> None:
        super().__init__()
        network = as_config(NetworkConfig, network)
        self.optim_cfg = as_config(OptimConfig, optim)
        self.distill_cfg = as_config(DistillConfig, distill)
        self.loss_cfg = as_config(LossConfig, loss)
        self.init_cfg = as_config(StitchInitConfig, stitch_init)
        self.bn_cfg = as_config(BatchNormCalibrationConfig, bn_calibration)
        if self.bn_cfg.images < 0 or self.bn_cfg.batch_size < 1:
            raise ValueError(f"bn_calibration needs images >= 0 (0: off) and batch_size >= 1, got {self.bn_cfg}")
        self.seed = seed
        self.predict_choice = as_config(StitchChoice, predict)
        if self.predict_choice.has_budget and self.predict_choice.results is None:  # refused before any work
            raise ValueError("predict: a budget (max_gflops, max_params, max_latency_ms) needs predict.results, "
                             "a results JSON written by `snnet validate`")
        # plain mappings, so checkpoints load with weights_only=True
        self.save_hyperparameters({
            "network": asdict(network), "optim": asdict(self.optim_cfg), "distill": asdict(self.distill_cfg),
            "loss": asdict(self.loss_cfg), "stitch_init": asdict(self.init_cfg), "bn_calibration": asdict(self.bn_cfg), "sampling": sampling,
            "sampling_groups": sampling_groups, "anchor_share": anchor_share, "eval_stitches": eval_stitches, "seed": seed, "compile": compile,
            "compile_options": compile_options,
            # LightningCLI rebuilds the module from a checkpoint (--ckpt_path) by this class path; the predict
            # choice is left out on purpose: a deployment option, so the command line's wins over the checkpoint
            "_class_path": f"{type(self).__module__}.{type(self).__qualname__}",
        })
        if self.optim_cfg.bn_stats not in BN_STATS:
            raise ValueError(f"unknown optim.bn_stats {self.optim_cfg.bn_stats!r}; choose one of {BN_STATS}")
        self.net = build_network(network)
        self.task = task_for(self.net)  # classification, or causal language modelling for a family of LMs
        if self.predict_choice.stitch is not None:
            self.net.check_id(self.predict_choice.stitch)  # an id out of range is refused before any work
        self.infos = self.net.table()
        weights = sampling_weights([i.flops for i in self.infos], sampling, sampling_groups)
        if self.optim_cfg.freeze_anchors:  # an anchor step would train nothing
            if anchor_share not in (None, 0.0):
                raise ValueError(f"anchor_share {anchor_share} with optim.freeze_anchors: frozen anchors train on no step; "
                                 "set anchor_share to null (or 0)")
            self.net.anchors.requires_grad_(False)
            anchor_share = 0.0
        if anchor_share is not None:
            weights = with_anchor_share(weights, self.net.num_anchors, anchor_share)
        self.register_buffer("sample_weights", weights, persistent=False)
        self.register_buffer("stitches_initialised", torch.tensor(False))
        # each anchor's score before training (the task's metric: top-1 %, or perplexity for a language
        # model), measured once at fit start and kept in the checkpoint
        self.register_buffer("pretrained_acc1", torch.full((self.net.num_anchors,), float("nan")))
        self.eval_ids = self._eval_ids(eval_stitches)
        self.val_scores = nn.ModuleList(self.task.scores() for _ in self.eval_ids)
        self.teacher = self._make_teacher(self.distill_cfg)
        self.mixup = self._make_mixup(self.loss_cfg, self.task.num_classes)
        # compiled: one graph per configuration (bounded, reused on every revisit); the teacher too
        self.forward_fn = compile_stitchable(self.net, **(compile_options or {})) if compile else self.net
        self.teacher_fn = torch.compile(self.teacher, **(compile_options or {})) if compile and self.teacher is not None else self.teacher
        self.results: list[StitchResult] = []
        self.figures: FrontFigures | None = None
        self.last_stitch: int | None = None
        self._calibrated_at: int | None = None  # global step of the BatchNorm statistics in the bank

    @property
    def data_config(self) -> dict[str, Any]:
        """timm data config (input size, mean/std, interpolation, crop) of the anchors, for the datamodule."""
        return self.net.data_config()

    # --- construction helpers ---------------------------------------------------------------
    @property
    def metric(self) -> str:
        """The score results are ranked by: ``acc1`` (higher is better) or ``ppl`` (lower is better)."""
        return self.task.metric

    def _eval_ids(self, which: str | int) -> list[int]:
        n, anchors = self.net.num_configs, self.net.num_anchors
        if which == "all":
            return list(range(n))
        if which == "anchors":
            return list(range(anchors))
        if isinstance(which, int) and which >= 1:
            return sorted(set(range(anchors)) | set(range(anchors, n, which)))
        raise ValueError(f"eval_stitches must be 'all', 'anchors' or a positive int k (anchors + every k-th), got {which!r}")

    def _make_teacher(self, cfg: DistillConfig) -> nn.Module | None:
        if cfg.teacher is None:
            return None
        if not 0.0 <= cfg.alpha <= 1.0:
            raise ValueError(f"distill.alpha must be in [0, 1], got {cfg.alpha}")
        if cfg.kind not in ("hard", "soft"):
            raise ValueError(f"distill.kind must be 'hard' or 'soft', got {cfg.kind!r}")
        if cfg.teacher == "largest_anchor":
            teacher = copy.deepcopy(self.net.anchors[-1])
        else:
            teacher = create_anchor(cfg.teacher, pretrained=cfg.pretrained and cfg.checkpoint is None, checkpoint=cfg.checkpoint,
                                    num_classes=self.task.num_classes)
        teacher.requires_grad_(False).eval()
        profile, view = self.net.profiles[-1], self.net.views[-1]
        with torch.no_grad(), unfused_attention(teacher):
            _, flops = count_flops(teacher, torch.zeros(1, *profile.input_size, dtype=view.input_dtype or torch.float32))
        self.teacher_flops = profile.per_unit(flops)
        log.info("teacher %s costs %.6f GFLOPs per %s (forward only)", cfg.teacher, self.teacher_flops / 1e9,
                 "token" if view.per_token else "image")
        return teacher

    def _make_mixup(self, cfg: LossConfig, num_classes: int):
        if cfg.mixup <= 0 and cfg.cutmix <= 0:
            return None
        if self.task.metric != "acc1":
            raise ValueError(f"loss.mixup {cfg.mixup} / loss.cutmix {cfg.cutmix} mix images; a language model takes neither (set both to 0)")
        from timm.data import Mixup

        return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=num_classes)

    # --- least-squares init -----------------------------------------------------------------
    def init_stitches(self) -> None:
        """Fit every stitching layer on un-augmented training images, once per run."""
        if bool(self.stitches_initialised):
            return
        cfg = self.init_cfg
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "calibration_batch"):
            raise RuntimeError("least-squares init needs a datamodule with calibration_batch(n)")
        images, _ = dm.calibration_batch(cfg.images)
        self.net.init_stitches_lstsq(images.split(cfg.batch_size), ridge=cfg.ridge)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for p in self.net.stitch_layers.parameters():
                torch.distributed.broadcast(p.data, src=0)
        self.stitches_initialised.fill_(True)

    def calibrate_batchnorm(self) -> None:
        """Every path's BatchNorm statistics on the calibration images (frozen anchors keep their own)."""
        cfg = self.bn_cfg
        if cfg.images == 0 or not self.net.has_batchnorm:
            return
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "calibration_batch"):
            raise RuntimeError("BatchNorm calibration needs a datamodule with calibration_batch(n); "
                               "set model.bn_calibration.images to 0 to evaluate with the shared statistics")
        images, _ = dm.calibration_batch(cfg.images, augmented=cfg.augmented)
        self.net.calibrate_batchnorm(images.split(cfg.batch_size), anchors=not self.optim_cfg.freeze_anchors)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for buffer in self.net.bn_bank.buffers():  # equal on every rank up to reduction order
                torch.distributed.broadcast(buffer, src=0)

    def calibrate_for_this_step(self) -> None:
        """Calibrate once per training step that is validated or checkpointed: a pure function of the
        weights, so every checkpoint holds the statistics of its own weights, whether or not a
        validation ran before it was written, and a resumed run writes the same ones."""
        if self._calibrated_at != self.global_step:
            self.calibrate_batchnorm()
            self._calibrated_at = self.global_step

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is None or self.trainer.state.fn != "fit" or self.trainer.sanity_checking:
            return
        self.calibrate_for_this_step()  # Lightning has collected the state already: refresh the bank's part
        checkpoint["state_dict"].update(self._bank_state())
        checkpoint[SCHEDULE_KEY] = self._schedule()

    def _schedule(self) -> dict[str, Any]:
        return {"total_steps": int(self.trainer.estimated_stepping_batches), "warmup_steps": self.optim_cfg.warmup_steps,
                "min_lr": self.optim_cfg.min_lr}

    def _bank_state(self) -> dict[str, Tensor]:
        """The bank's entries of this module's state dict (under every name the network has: the
        uncompiled ``forward_fn`` is the network itself)."""
        return {k: v for k, v in self.state_dict().items() if ".bn_bank." in k}

    @torch.inference_mode()
    def measure_pretrained(self) -> None:
        """Every anchor's score (the task's metric) on the validation data before any training step,
        once per run, so that each validation can report how far training moved the anchors."""
        if not bool(torch.isnan(self.pretrained_acc1).any()):
            return
        dm = self.trainer.datamodule if self._trainer is not None else None
        limit = self.trainer.limit_val_batches
        if dm is None or limit == 0:
            return
        loader = dm.val_dataloader()
        batches = len(loader) if isinstance(limit, float) and limit >= 1.0 else (int(limit) if isinstance(limit, int) else max(1, int(limit * len(loader))))
        anchors = list(range(self.net.num_anchors))
        scores = nn.ModuleList(self.task.scores() for _ in anchors).to(self.device)
        seen = 0
        was_training = self.net.training
        self.net.eval()
        try:
            for i, (x, y) in enumerate(loader):
                if i >= batches:
                    break
                x, y = x.to(self.device), y.to(self.device)
                outputs = self.net.forward_many(x, anchors)
                for a in anchors:
                    scores[a].update(outputs[a], y)
                seen += len(y)
        finally:
            self.net.train(was_training)
        if seen:
            metric = self.task.metric
            self.pretrained_acc1.copy_(torch.tensor([score.compute()[metric] for score in scores]))
            log.info("pretrained anchors' %s on %d validation samples: %s", metric, seen, [round(float(a), 3) for a in self.pretrained_acc1])

    def on_fit_start(self) -> None:
        self.init_stitches()
        self.measure_pretrained()
        if self.optim_cfg.freeze_anchors:  # Lightning keeps (and restores after validation) each module's mode
            self.net.anchors.eval()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "fit":
            self.init_stitches()
            if not any(self.net.bn_bank.ready):  # a checkpoint keeps the statistics it was validated with
                self.calibrate_batchnorm()
        elif not self.trainer.sanity_checking:
            self.calibrate_for_this_step()

    def on_test_start(self) -> None:
        self.on_validation_start()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._saved_schedule = checkpoint.get(SCHEDULE_KEY)  # compared in configure_optimizers, which runs after
        # checkpoints written before the pretrained accuracies were kept: not measured
        state = checkpoint.get("state_dict", {})
        state.setdefault("pretrained_acc1", torch.full((self.net.num_anchors,), float("nan")))
        # ... and before per-path BatchNorm statistics: uncalibrated, so the shared ones
        for name, buffer in self._bank_state().items():
            state.setdefault(name, torch.zeros_like(buffer) if buffer.dtype == torch.bool else buffer)
        if self.strict_loading:  # one line instead of load_state_dict's list of every key
            check_fits(self, checkpoint, self._trainer.ckpt_path if self._trainer is not None else None)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # dropout, drop-path and mixup draw from (seed, epoch, batch, rank): a resumed run draws the same
        seed_global_rngs(derive_seed(self.seed, STEP, self.current_epoch, batch_idx, self.global_rank))

    # --- training ---------------------------------------------------------------------------
    def forward(self, x: Tensor, stitch: int | None = None) -> Tensor:
        return self.net(x, stitch)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        stitch = sample_stitch(self.sample_weights, self.seed, self.global_step)
        self.net.set_stitch(stitch)
        self.last_stitch = stitch
        if self.optim_cfg.bn_stats == "anchor_steps" and not self.optim_cfg.freeze_anchors:
            set_batchnorm_training(self.net.anchors, self.net.configs[stitch].is_anchor)
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        logits = self.forward_fn(x)
        loss = self._loss(logits, target, x)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/stitch", float(stitch))
        return loss

    def _loss(self, logits: Tensor, target: Tensor, x: Tensor) -> Tensor:
        base = self.task.loss(logits, target, self.loss_cfg.label_smoothing)
        if self.teacher is None:
            return base
        cfg = self.distill_cfg
        with torch.inference_mode():
            teacher_logits = self.task.teacher_logits(self.teacher_fn(x))
        kd = self.task.distill(logits, teacher_logits.clone(), cfg.kind, cfg.temperature)
        return (1 - cfg.alpha) * base + cfg.alpha * kd

    def train(self, mode: bool = True) -> "SNNetModule":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        if self.optim_cfg.freeze_anchors:
            self.net.anchors.eval()  # frozen BatchNorm statistics too
        return self

    # --- evaluation -------------------------------------------------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        outputs = self.net.forward_many(x, self.eval_ids)  # shared prefixes computed once
        for i, stitch in enumerate(self.eval_ids):
            self.val_scores[i].update(outputs[stitch], y)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self.results = []
        for i, stitch in enumerate(self.eval_ids):
            self.results.append(stitch_result(self.net, stitch, **self.val_scores[i].compute()))
        pretrained = {a: float(v) for a, v in enumerate(self.pretrained_acc1.tolist())}
        scored = {r.id for r in self.results}
        metric = self.task.metric
        # the figures need every anchor scored; a validation subset without them reports none
        self.figures = front_figures(self.results, pretrained, metric) if set(range(self.net.num_anchors)) <= scored else None
        if not self.trainer.sanity_checking and self.results:
            stage = "test" if self.trainer.state.fn == "test" else "val"
            metrics = {f"{stage}/{metric}_stitch_{r.id:03d}": getattr(r, metric) for r in self.results}
            metrics[f"{stage}/{metric}_mean"] = sum(getattr(r, metric) for r in self.results) / len(self.results)
            fig = self.figures
            if fig is not None:
                metrics.update({f"{stage}/stitches_on_front": float(fig.on_front), f"{stage}/stitches_below_lower_anchor": float(fig.below_lower)})
                if fig.median_gap is not None:
                    metrics[f"{stage}/median_gap_to_anchor_line"] = fig.median_gap
                metrics.update({f"{stage}/anchor_change_{name}": v for name, v in fig.anchor_change.items()})
            self.log_dict(metrics, sync_dist=False)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def on_predict_start(self) -> None:
        """Run the chosen stitch: ``predict.stitch``, or the most accurate within ``predict``'s budget."""
        self.net.set_stitch(self.predict_choice.resolve(self.net))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.net(x).softmax(-1)

    # --- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.optim_cfg
        groups = [
            *decay_groups(self.net.anchors.parameters(), cfg.weight_decay, lr=cfg.lr * cfg.anchor_lr_scale),
            *decay_groups(self.net.stitch_layers.parameters(), cfg.weight_decay, lr=cfg.lr),
        ]
        fused = self.device.type == "cuda"
        if cfg.name == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)
        elif cfg.name == "sgd":
            optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, fused=fused)
        else:
            raise ValueError(f"unknown optimizer {cfg.name!r}; choose one of {OPTIMIZERS}")
        schedule = warmup_cosine(optimizer, self.trainer.estimated_stepping_batches, cfg.warmup_steps, cfg.min_lr)
        change = schedule_change(getattr(self, "_saved_schedule", None), self._schedule())
        if change:
            rank_zero_warn(change)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

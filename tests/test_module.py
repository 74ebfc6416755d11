"""The SN-Net LightningModule on tiny CIFAR ResNets and the offline digits: LS init at fit start,
per-stitch validation, bit-exact resume after a crash, loss options and bad input."""
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import RecordStitches, tiny_data, tiny_module
from snnet.sn_net.module import DistillConfig, LossConfig, OptimConfig, SNNetModule


class CrashAt(L.Callback):
    """Simulates a killed run: raises before the checkpoint of step ``step`` is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def run_fit(tmp_path, extra=(), ckpt_path=None, epochs=2):
    module = tiny_module()
    record = RecordStitches()
    callbacks = [record, *extra, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True)]
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False, deterministic=True,
        limit_val_batches=1, num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=tmp_path,
    )
    trainer.fit(module, tiny_data(module), ckpt_path=ckpt_path)
    return module, record.stitches, trainer


def test_interrupted_run_resumes_bit_exact(tmp_path):
    full, full_stitches, _ = run_fit(tmp_path / "full")
    steps = len(full_stitches)
    crash = CrashAt(steps // 2 + 1)  # mid-epoch 2
    record = RecordStitches()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_fit(tmp_path / "resumed", extra=[record, crash])
    crashed_stitches = record.stitches
    assert len(crashed_stitches) == steps // 2 + 1  # its last step never reached a checkpoint
    resumed, resumed_stitches, _ = run_fit(tmp_path / "resumed", ckpt_path="last")
    assert bool(resumed.stitches_initialised)
    assert crashed_stitches[:-1] + resumed_stitches == full_stitches  # the crashed step is redone
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_lstsq_init_runs_once_at_fit_start_and_not_on_resume(tmp_path, monkeypatch):
    module = tiny_module()
    before = [p.clone() for p in module.net.stitch_layers.parameters()]
    calls = []
    original = module.net.init_stitches_lstsq
    monkeypatch.setattr(module.net, "init_stitches_lstsq", lambda *a, **k: calls.append(1) or original(*a, **k))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, tiny_data(module))
    assert calls == [1] and bool(module.stitches_initialised)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.net.stitch_layers.parameters()))
    module.init_stitches()  # already initialised: a no-op
    assert calls == [1]


def test_validation_scores_every_stitch(tmp_path):
    module = tiny_module()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.validate(module, tiny_data(module))
    assert [r.id for r in module.results] == list(range(module.net.num_configs))
    assert all(0.0 <= r.acc1 <= r.acc5 <= 100.0 for r in module.results)
    assert bool(module.stitches_initialised)  # validate alone initialises the stitches first


def test_anchor_lr_scale_and_no_decay_groups():
    module = tiny_module(teacher=None)
    module.optim_cfg = OptimConfig(lr=1e-2, anchor_lr_scale=0.1, weight_decay=0.05, warmup_steps=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, tiny_data(module))
    anchor_ids = {id(p) for p in module.net.anchors.parameters()}
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 4
    for group in groups:
        in_anchors = {id(p) in anchor_ids for p in group["params"]}
        assert len(in_anchors) == 1  # a group holds anchor weights or stitching weights, never both
        assert group["initial_lr"] == pytest.approx(1e-3 if in_anchors.pop() else 1e-2)
        assert (group["weight_decay"] == 0.0) == all(p.ndim <= 1 for p in group["params"])


def test_soft_distillation_is_kl_with_temperature():
    module = tiny_module(teacher="largest_anchor")
    module.distill_cfg = DistillConfig(teacher="largest_anchor", kind="soft", alpha=1.0, temperature=2.0)
    x = torch.randn(4, 3, 16, 16)
    logits = torch.randn(4, 10)
    with torch.no_grad():
        t = module.teacher(x)
    expected = torch.nn.functional.kl_div((logits / 2).log_softmax(-1), (t / 2).softmax(-1), reduction="batchmean") * 4
    assert torch.allclose(module._loss(logits, torch.zeros(4, dtype=torch.long), x), expected, atol=1e-5)


def test_bad_config_values_name_the_choices():
    with pytest.raises(ValueError, match="eval_stitches"):
        SNNetModule(network=tiny_module().hparams.network, eval_stitches="some")
    with pytest.raises(ValueError, match="alpha"):
        SNNetModule(network=tiny_module().hparams.network, distill=DistillConfig(teacher="largest_anchor", alpha=2.0))
    with pytest.raises(ValueError, match="unknown anchor model 'cifar_resnet21'"):
        from snnet.sn_net.build import NetworkConfig

        NetworkConfig(anchors=["cifar_resnet21"])
    assert LossConfig().mixup == 0.0


def test_mixup_gives_soft_targets_and_a_training_step_runs(tmp_path):
    module = SNNetModule(network=tiny_module().hparams.network, loss=LossConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    mixed, target = module.mixup(x, y)
    assert target.shape == (8, 10) and torch.allclose(target.sum(-1), torch.ones(8))
    logits = torch.randn(8, 10)
    expected = -(target * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(module._loss(logits, target, mixed), expected)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, tiny_data(module))
    assert trainer.global_step == 2

"""Anchor-preserving training and the learning-rate schedule: a frozen anchor ends bit-identical
(weights and BatchNorm statistics) with no gradient computed for it, and the cosine floor scales
with each group's own learning rate."""
import lightning as L
import pytest
import torch

from helpers import RecordStitches, tiny_data, tiny_module
from snnet.sn_net.module import OptimConfig
from snnet.optim import warmup_cosine


def lrs_over(steps: int, lrs: list[float], warmup: int, min_lr: float) -> list[list[float]]:
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    optimizer = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], lr=lrs[0])
    scheduler = warmup_cosine(optimizer, steps, warmup, min_lr)["scheduler"]
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    seen.append([g["lr"] for g in optimizer.param_groups])
    return seen


def test_cosine_floor_scales_with_each_groups_lr():
    seen = lrs_over(100, [1e-3, 0.0, 1e-6], warmup=10, min_lr=1e-5)
    assert all(lrs[1] == 0.0 for lrs in seen)  # a group at lr 0 stays at 0 (was: climbs to min_lr)
    assert seen[10][0] == pytest.approx(1e-3) and seen[10][2] == pytest.approx(1e-6)  # peak after warmup
    assert seen[-1][0] == pytest.approx(1e-5) and seen[-1][2] == pytest.approx(1e-8)  # floor = min_lr / lr of each
    assert seen[0][0] == pytest.approx(1e-6)  # warmup starts at 1e-3 of the lr
    assert seen[55][0] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # half way down the cosine


class KeepLstsqWeights(L.Callback):
    """The stitching layers' weights as training starts, after the least-squares fit of fit start."""

    def on_train_start(self, trainer, module) -> None:
        self.weights = [layer.proj.weight.clone() for layer in module.net.stitch_layers]


@pytest.mark.parametrize("network", [{}, {"two_way": True, "stitch_lora_rank": 4}], ids=["v1", "two-way-lora"])
def test_frozen_anchors_end_bit_identical_and_only_stitches_train(tmp_path, network):
    """Also with SN-Netv2's space and LoRA stitching layers: anchors untouched, the least-squares
    weights untouched, only the low-rank updates and biases of the stitches move."""
    module = tiny_module(optim=OptimConfig(lr=1e-2, warmup_steps=0, freeze_anchors=True), network=network)
    before = {k: v.clone() for k, v in module.net.anchors.state_dict().items()}
    stitches_before = [p.clone() for p in module.net.stitch_layers.parameters()]
    record, lstsq = RecordStitches(), KeepLstsqWeights()
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[record, lstsq])
    trainer.fit(module, tiny_data(module))
    after = module.net.anchors.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running statistics
    assert all(p.grad is None for p in module.net.anchors.parameters())  # no gradient computed for them
    assert all(s >= module.net.num_anchors for s in record.stitches)  # every step trains a stitch
    assert any(not torch.equal(a, b) for a, b in zip(stitches_before, module.net.stitch_layers.parameters()))
    if network.get("stitch_lora_rank"):
        assert any(len(c.hops) == 2 for c in module.net.configs)  # the two-way space: two-hop routes too
        assert all(torch.equal(w, layer.proj.weight) for w, layer in zip(lstsq.weights, module.net.stitch_layers))
        assert any(torch.count_nonzero(layer.lora_b) for layer in module.net.stitch_layers)
    assert not any(id(p) in {id(q) for q in module.net.anchors.parameters()}
                   for g in trainer.optimizers[0].param_groups for p in g["params"])


class BatchNormSteps(L.Callback):
    """Per training step: the configuration and which anchors' BatchNorm running statistics changed."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, set[int]]] = []

    @staticmethod
    def stats(module) -> list[list[torch.Tensor]]:
        return [[b.clone() for n, b in anchor.named_buffers() if "running_" in n] for anchor in module.net.anchors]

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before = self.stats(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        after = self.stats(module)
        changed = {a for a, (b0, b1) in enumerate(zip(self.before, after)) if any(not torch.equal(x, y) for x, y in zip(b0, b1))}
        self.steps.append((module.last_stitch, changed))


@pytest.mark.parametrize("bn_stats", ["all_steps", "anchor_steps"])
def test_bn_stats_anchor_steps_keeps_each_anchors_statistics_its_own(tmp_path, bn_stats):
    """``anchor_steps``: a stitch's step leaves every anchor's running statistics as they were and an
    anchor's step updates its own; ``all_steps`` (as published) lets a stitch's step overwrite them."""
    module = tiny_module(optim=OptimConfig(lr=1e-3, warmup_steps=0, bn_stats=bn_stats), anchor_share=0.5)
    record = BatchNormSteps()
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[record])
    trainer.fit(module, tiny_data(module))
    configs = module.net.configs
    anchor_steps = [(s, changed) for s, changed in record.steps if configs[s].is_anchor]
    stitch_steps = [(s, changed) for s, changed in record.steps if not configs[s].is_anchor]
    assert anchor_steps and stitch_steps  # half the steps on the anchors
    assert all(changed == {configs[s].anchors[0]} for s, changed in anchor_steps)
    if bn_stats == "anchor_steps":
        assert all(changed == set() for _, changed in stitch_steps)
    else:
        assert all(changed == set(configs[s].anchors) for s, changed in stitch_steps)


def test_bad_bn_stats_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown optim.bn_stats 'never'; choose one of \('all_steps', 'anchor_steps'\)"):
        tiny_module(optim=OptimConfig(bn_stats="never"))
    with pytest.raises(ValueError, match=r"anchor_share 0.5 with optim.freeze_anchors: frozen anchors train on no step"):
        tiny_module(optim=OptimConfig(freeze_anchors=True), anchor_share=0.5)

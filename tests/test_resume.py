"""Kill -9 a real `snnet fit` (subprocess, loader workers, default sanity check), resume it with
`--ckpt_path last`, and get what an uninterrupted run gets: every tensor of every checkpoint
bit-identical and the same per-stitch results file. Kill points: during validation (resumes
mid-epoch), mid-epoch after a step checkpoint, right after an epoch-end checkpoint, and inside the
write of last.ckpt; then the same for 2-process DDP (gloo) (FSDP and bf16 on a GPU: test_cuda.py). Broken checkpoints give one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import EPOCHS, STEPS_PER_EPOCH, assert_killed_and_resumed_equals_uninterrupted, assert_same_checkpoint, load, snnet_fit, tiny_config
from snnet.checkpoint_io import PARTIAL


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    snnet_fit(tiny_config(out))
    return out


@pytest.mark.slow
def test_killed_at_four_points_and_resumed_equals_uninterrupted(uninterrupted, tmp_path):
    ckpts = tmp_path / "checkpoints"
    # 1. during epoch 0's validation: last.ckpt is step 4's, so the resume starts mid-epoch
    snnet_fit(tiny_config(tmp_path, {"point": "validation", "epoch": 0}), expect="killed")
    assert load(ckpts / "last.ckpt")["global_step"] == 4
    # 2. mid-epoch 1, after the step-8 checkpoint
    snnet_fit(tiny_config(tmp_path, {"point": "train_batch", "step": 10}), "--ckpt_path", "last", expect="killed")
    assert load(ckpts / "last.ckpt")["global_step"] == 8
    # 3. as epoch 3 starts, right after epoch 2's end-of-epoch (validation) checkpoint; resume from that file
    snnet_fit(tiny_config(tmp_path, {"point": "epoch_start", "epoch": 3}), "--ckpt_path", "last", expect="killed")
    epoch_end = ckpts / "epoch=2-step=18.ckpt"
    assert load(ckpts / "last.ckpt")["global_step"] == 16
    # 4. inside the write of last.ckpt at step 20 (saves: step 20's own file, then last.ckpt)
    snnet_fit(tiny_config(tmp_path, {"point": "save", "save": 2}), "--ckpt_path", str(epoch_end), expect="killed")
    assert (ckpts / f"last.ckpt{PARTIAL}").is_file()  # the kill landed inside the write
    assert load(ckpts / "last.ckpt")["global_step"] == 16  # the previous one, whole
    snnet_fit(tiny_config(tmp_path), "--ckpt_path", "last")

    assert_same_checkpoint(ckpts / "last.ckpt", uninterrupted / "checkpoints" / "last.ckpt")
    assert load(ckpts / "last.ckpt")["global_step"] == EPOCHS * STEPS_PER_EPOCH
    # every checkpoint any segment wrote (some twice, as -v1) equals the uninterrupted run's of that step
    reference = {load(p)["global_step"]: p for p in (uninterrupted / "checkpoints").glob("epoch=*.ckpt")}
    assert sorted(reference) == [4, 6, 8, 12, 16, 18, 20, 24]  # every 4 steps and at each epoch end
    chain = list(ckpts.glob("epoch=*.ckpt"))
    assert {load(p)["global_step"] for p in chain} == set(reference)
    for path in chain:
        assert_same_checkpoint(path, reference[load(path)["global_step"]])
    assert json.loads((tmp_path / "fit_results.json").read_text()) == json.loads((uninterrupted / "fit_results.json").read_text())


@pytest.mark.slow
def test_ddp_killed_and_resumed_equals_uninterrupted(tmp_path):
    """2-process DDP (gloo); FSDP and bf16 on a GPU: tests/test_cuda.py."""
    assert_killed_and_resumed_equals_uninterrupted(tmp_path, strategy="ddp_find_unused_parameters_true", accelerator="cpu", devices=2)


def test_training_batches_depend_on_seed_and_epoch_only():
    """Same augmented batches with 0 or 2 workers, a resumed epoch's rest equals its tail, and two
    ranks split each epoch's permutation."""
    from helpers import tiny_module
    from snnet.data import DigitsDataModule, EpochSampler

    module = tiny_module(teacher=None)

    def batches(num_workers: int, epoch: int, skip_batches: int = 0) -> list[torch.Tensor]:
        dm = DigitsDataModule(data_config=module.data_config, batch_size=16, train_limit=64, num_workers=num_workers,
                              train_transform="cifar")
        dm.load_state_dict({"epoch": epoch, "batches_done": skip_batches, "world_size": 1})
        return [x for x, _ in dm.train_dataloader()]

    full = batches(0, epoch=2)
    assert all(torch.equal(a, b) for a, b in zip(full, batches(2, epoch=2)))
    rest = batches(2, epoch=2, skip_batches=1)
    assert len(rest) == len(full) - 1 and all(torch.equal(a, b) for a, b in zip(full[1:], rest))
    assert not torch.equal(full[0], batches(0, epoch=3)[0])  # another epoch: another order and augmentation
    ranks = [[i for i, _ in EpochSampler(10, 0, 2, r, epoch=1)] for r in (0, 1)]
    whole = [i for i, _ in EpochSampler(10, 0, epoch=1)]
    assert ranks[0] == whole[0::2] and ranks[1] == whole[1::2]

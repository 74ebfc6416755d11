"""Kill -9 a real `snnet fit` (subprocess, loader workers, default sanity check), resume it with
`--ckpt_path last`, and get what an uninterrupted run gets: every tensor of every checkpoint
bit-identical and the same per-stitch results file. Kill points: during validation (resumes
mid-epoch), mid-epoch after a step checkpoint, right after an epoch-end checkpoint, and inside the
write of last.ckpt; then the same for 2-process DDP (gloo), and for FSDP where a GPU exists. Broken checkpoints give one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from snnet.checkpoint_io import PARTIAL

TESTS = Path(__file__).parent
ROOT = TESTS.parent
STEPS_PER_EPOCH = 6  # 96 training digits, batch 16
EPOCHS = 4


def tiny_config(out: Path, kill: dict | None = None, devices: int = 1, strategy: str = "ddp_find_unused_parameters_true",
                accelerator: str = "cpu") -> Path:
    """The quickstart's shape, tiny: two random-init CIFAR ResNets, 96 digits, 2 loader workers.
    Checkpoints: every 4 steps (and last.ckpt) and at each epoch end (validation), all kept."""
    ckpt = {"dirpath": str(out / "checkpoints"), "save_top_k": -1}
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {**ckpt, "every_n_train_steps": 4, "save_last": True}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": ckpt},  # at each validation end
        {"class_path": "snnet.callbacks.StitchReport", "init_args": {"out_dir": str(out)}},
    ]
    if kill:
        callbacks.append({"class_path": "kill_switch.KillAt", "init_args": kill})
    trainer = {"max_epochs": EPOCHS, "accelerator": accelerator, "devices": devices, "logger": False,
               "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(out),
               "callbacks": callbacks}
    if devices > 1 or strategy == "fsdp":
        trainer["strategy"] = strategy
    if accelerator != "cpu":
        trainer["deterministic"] = True  # bit-exact on a GPU needs deterministic kernels
    config = {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {"class_path": "snnet.sn_net.module.SNNetModule", "init_args": {
            "network": {"anchors": ["cifar_resnet8", "cifar_resnet14"], "pretrained": False, "input_size": [3, 16, 16]},
            "optim": {"lr": 0.001, "warmup_steps": 2},
            "distill": {"teacher": "largest_anchor"},
            "stitch_init": {"images": 32, "batch_size": 16},
        }},
        "data": {"class_path": "snnet.data.DigitsDataModule", "init_args": {
            "batch_size": 16 // devices, "train_limit": 96, "val_limit": 32, "num_workers": 2,
            "train_transform": "cifar",  # random crops and flips in the workers: augmentation must resume too
        }},
    }
    name = "kill_" + "_".join(f"{k}{v}" for k, v in kill.items()) if kill else "run"
    path = out / f"{name}.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def snnet_fit(config: Path, *args: str, expect: str = "ok") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "snnet.cli", "fit", "--config", str(config), *args],
                          env=env, capture_output=True, text=True, timeout=1200)  # a guard against hangs
    if expect == "killed":
        assert proc.returncode == -9, f"expected SIGKILL, got rc {proc.returncode}\n{proc.stderr[-3000:]}"
    elif expect == "ok":
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where: str) -> None:
    """Every tensor in two (nested) checkpoint sections equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ca, cb = load(a), load(b)
    assert ca["global_step"] == cb["global_step"], (a, b)
    for section in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_same_tensors(ca[section], cb[section], f"{a.name}:{section}")


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


# FSDP needs an accelerator: Lightning refuses `strategy: fsdp` with `accelerator: cpu`, and torch's
# FSDP itself stops with "FSDP needs a non-CPU accelerator device" (both tried here, torch 2.14.1).
DISTRIBUTED = [
    pytest.param("ddp_find_unused_parameters_true", "cpu", 2, id="ddp-2-cpu"),
    pytest.param("fsdp", "cuda", min(2, torch.cuda.device_count()), id="fsdp-cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="FSDP needs a CUDA device (Lightning and torch refuse FSDP on CPU)")),
]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, accelerator, devices", DISTRIBUTED)
def test_distributed_killed_and_resumed_equals_uninterrupted(strategy, accelerator, devices, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run = {"devices": devices, "strategy": strategy, "accelerator": accelerator}
    snnet_fit(tiny_config(full, **run))
    # each rank sees 96 / devices digits a epoch: 6 steps of 16 / devices; every rank kills itself at step 9
    snnet_fit(tiny_config(resumed, {"point": "train_batch", "step": 9}, **run), expect="killed")
    assert load(resumed / "checkpoints" / "last.ckpt")["global_step"] == 8
    snnet_fit(tiny_config(resumed, **run), "--ckpt_path", "last")
    assert_same_checkpoint(resumed / "checkpoints" / "last.ckpt", full / "checkpoints" / "last.ckpt")
    assert json.loads((resumed / "fit_results.json").read_text()) == json.loads((full / "fit_results.json").read_text())

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

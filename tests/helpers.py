"""Small builders shared by the tests: tiny CIFAR ResNets on the offline digits, a tiny `snnet fit`
config run (and killed) in a subprocess, `snnet serve` started and stopped."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
import yaml

from snnet.sn_net.build import NetworkConfig, build_network
from snnet.data import DigitsDataModule
from snnet.sn_net.module import DistillConfig, OptimConfig, SNNetModule, StitchInitConfig


class RecordStitches(L.Callback):
    """Remembers which configuration every training step sampled."""

    def __init__(self) -> None:
        self.stitches: list[int] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.stitches.append(module.last_stitch)


def tiny_module(seed: int = 0, teacher: str | None = "largest_anchor", optim: OptimConfig | None = None,
                network: dict | None = None, **kwargs) -> SNNetModule:
    """Two random-init CIFAR ResNets at 16 px; ``network``: more NetworkConfig fields (two_way, ...)."""
    L.seed_everything(seed)
    return SNNetModule(
        network=NetworkConfig(anchors=["cifar_resnet8", "cifar_resnet14"], pretrained=False, input_size=(3, 16, 16), **(network or {})),
        optim=optim or OptimConfig(lr=1e-3, warmup_steps=2),
        distill=DistillConfig(teacher=teacher),
        stitch_init=StitchInitConfig(images=32, batch_size=16),
        seed=seed,
        **kwargs,
    )


def tiny_data(module: SNNetModule, **kw) -> DigitsDataModule:
    kw = {"batch_size": 16, "train_limit": 96, "val_limit": 32, "num_workers": 0, **kw}
    return DigitsDataModule(data_config=module.data_config, **kw)


def assert_forward_many_is_one_at_a_time(net, x) -> None:
    """``forward_many`` over every configuration (in reverse order) equals each stitch run alone, bit for bit."""
    ids = list(range(net.num_configs))
    with torch.no_grad():
        many = net.forward_many(x, ids[::-1])
        for s in ids:
            assert torch.equal(many[s], net(x, s)), s


def assert_path_parameters_are_what_a_step_updates(net, x) -> None:
    """For every configuration, ``path_parameters`` is exactly the set a backward gives gradients,
    and its size is the configuration's parameter count."""
    for stitch in range(net.num_configs):
        net.zero_grad(set_to_none=True)
        net(x, stitch).sum().backward()
        with_grad = {id(p) for p in net.parameters() if p.grad is not None}
        params = net.path_parameters(stitch)
        assert {id(p) for p in params} == with_grad, stitch
        assert sum(p.numel() for p in params) == net.infos[stitch].params
    net.zero_grad(set_to_none=True)


def perturbed_network(config: NetworkConfig, layer_std: float = 0.1, mean_std: float = 0.1, var_range=(0.5, 1.5)):
    """The network of ``config`` (seed 0, eval mode) with random stitching layers and BatchNorm running
    statistics that are not the data's, so that tests see the statistics a path uses."""
    torch.manual_seed(0)
    net = build_network(config).eval()
    with torch.no_grad():
        for p in net.stitch_layers.parameters():
            p.normal_(0, layer_std)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, mean_std)
                m.running_var.uniform_(*var_range)
    return net


# --- `snnet fit` in a subprocess, killed and resumed (tests/test_resume.py, tests/test_cuda.py) ------
TESTS = Path(__file__).parent
ROOT = TESTS.parent
STEPS_PER_EPOCH = 6  # 96 training digits, batch 16
EPOCHS = 4


def tiny_config(out: Path, kill: dict | None = None, devices: int = 1, strategy: str = "ddp_find_unused_parameters_true",
                accelerator: str = "cpu", precision: str = "32-true") -> Path:
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
    trainer = {"max_epochs": EPOCHS, "accelerator": accelerator, "devices": devices, "logger": False, "precision": precision,
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


def assert_killed_and_resumed_equals_uninterrupted(tmp_path: Path, **run) -> None:
    """A run of ``tiny_config(**run)`` killed at step 9 and resumed from last.ckpt ends with the
    uninterrupted run's last checkpoint (every tensor, bit for bit) and its results file."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    snnet_fit(tiny_config(full, **run))
    # each rank sees 96 / devices digits a epoch: 6 steps of 16 / devices; every rank kills itself at step 9
    snnet_fit(tiny_config(resumed, {"point": "train_batch", "step": 9}, **run), expect="killed")
    assert load(resumed / "checkpoints" / "last.ckpt")["global_step"] == 8
    snnet_fit(tiny_config(resumed, **run), "--ckpt_path", "last")
    assert_same_checkpoint(resumed / "checkpoints" / "last.ckpt", full / "checkpoints" / "last.ckpt")
    assert json.loads((resumed / "fit_results.json").read_text()) == json.loads((full / "fit_results.json").read_text())


# --- `snnet serve` in a subprocess (tests/test_serve.py, tests/test_cuda.py) ---------------------
SERVE_KEY = "test-key"
SERVE_HEADERS = {"X-API-Key": SERVE_KEY}


def start_server(ckpt: Path, results: Path, *options: str, timeout: float = 600.0) -> tuple[subprocess.Popen, str]:
    """`snnet serve` on a free loopback port, its output in a temporary file (``read_log``)."""
    from snnet.serve.process import start_serve

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # small models: no thread contention
    log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the server runs
    try:
        proc, url = start_serve(["--ckpt", str(ckpt), "--results", str(results), *options], env, timeout, SERVE_HEADERS,
                                stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own group: stop() ends all
    except RuntimeError as e:
        log.seek(0)
        raise RuntimeError(f"{e}:\n{log.read()}") from None
    proc.log = log
    return proc, url


def read_log(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


def stop_server(proc) -> None:
    """SIGTERM (the server drains), then SIGKILL to its whole process group (HTTP process, worker)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

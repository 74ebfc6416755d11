"""Checkpoints that survive a kill and bad input files that give one line: atomic writes,
truncated / random-byte / foreign / other-architecture checkpoints and malformed results JSON,
through every entry point that reads them (load_network, export, select, bench latency, fit)."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from helpers import tiny_module
from snnet.deploy.load import load_network
from snnet.checkpoint_io import PARTIAL, CheckpointError, check_fits, read_checkpoint
from snnet.checkpoint_write import AtomicCheckpointIO
from snnet.cli import main
from snnet.results import load_results


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real `snnet fit`-style checkpoint (module state and hyper-parameters), written atomically."""
    module = tiny_module(teacher=None)
    path = tmp_path_factory.mktemp("ckpt") / "epoch=0-step=1.ckpt"
    AtomicCheckpointIO().save_checkpoint(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 1}, path)
    return path


def damaged(folder, good, kind: str):
    path = folder / f"{kind}.ckpt"
    data = good.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "random": os.urandom(4096), "empty": b""}[kind])
    os.utime(good)  # the good one stays the newest complete file beside it
    return path


def test_atomic_write_leaves_no_partial_and_reads_back(good):
    assert not good.with_name(good.name + PARTIAL).exists()
    assert read_checkpoint(good)["global_step"] == 1


@pytest.mark.parametrize("kind, reason", [
    ("truncated", "truncated: the archive ends before its directory"),
    ("random", "not a PyTorch checkpoint"),
    ("empty", "the file is empty"),
])
def test_unreadable_checkpoint_names_file_reason_and_last_good(tmp_path, good, kind, reason):
    bad = damaged(good.parent, good, kind)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(bad)
    message = str(info.value)
    assert message.startswith(f"checkpoint {bad}: {reason}")
    assert f"the newest complete checkpoint beside it is {good}" in message
    assert "\n" not in message
    lone = tmp_path / "lone.ckpt"
    lone.write_bytes(bad.read_bytes())
    with pytest.raises(CheckpointError, match="no complete checkpoint beside it"):
        read_checkpoint(lone)
    bad.unlink()


def test_torch_file_that_is_not_a_lightning_checkpoint(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        read_checkpoint(path)


def test_checkpoint_of_another_architecture(tmp_path, good):
    checkpoint = read_checkpoint(good)
    other = tiny_module(teacher=None)
    other.net.stitch_layers = torch.nn.ModuleList()  # a family with no stitching layers
    with pytest.raises(CheckpointError, match=rf"checkpoint {good}: written for another architecture .* unexpected weights"):
        check_fits(other, checkpoint, good)
    check_fits(tiny_module(teacher=None), checkpoint, good)  # the same architecture passes
    # weights that do not match the checkpoint's own network config (a hand-edited file)
    checkpoint["hyper_parameters"]["network"]["anchors"] = ["cifar_resnet8", "cifar_resnet20"]
    edited = tmp_path / "edited.ckpt"
    torch.save(checkpoint, edited)
    with pytest.raises(CheckpointError, match=rf"checkpoint {edited}: its weights do not fit .*other shapes|missing"):
        load_network(edited)


def test_commands_print_one_line_for_bad_files(tmp_path, good, capsys):
    bad = damaged(good.parent, good, "random")
    results, fine = tmp_path / "results.json", tmp_path / "fine.json"
    results.write_text('[\n  {"id": 0,\n')
    fine.write_text('[{"id": 0, "name": "cifar_resnet8", "flops": 1, "params": 1, "is_anchor": true}]')
    runs = [
        (["export", "--ckpt", str(bad), "--stitch", "0", "--out", str(tmp_path / "out")], f"snnet export: checkpoint {bad}: not a PyTorch"),
        (["bench", "latency", "--ckpt", str(bad), "--results", str(fine)], f"snnet bench latency: checkpoint {bad}: not a PyTorch"),
        (["select", "--results", str(results), "--max-gflops", "1"], f"snnet select: results file {results}: not valid JSON"),
    ]
    for argv, line in runs:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(line) and err.count("\n") == 1, err
    with pytest.raises(ValueError, match=f"results file {results}: not valid JSON"):
        load_results(results)
    bad.unlink()


def test_fit_resume_from_unreadable_checkpoint_is_one_line(tmp_path, good, capsys):
    from helpers import tiny_config

    config = tiny_config(tmp_path)
    for kind in ("truncated", "random"):
        bad = damaged(good.parent, good, kind)
        with pytest.raises(SystemExit) as info:
            main(["fit", "--config", str(config), "--ckpt_path", str(bad)])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"snnet fit: checkpoint {bad}: ") and f"beside it is {good}" in err[-1]
        assert not any("Traceback" in line for line in err)
        bad.unlink()


@pytest.mark.parametrize("last_state", ["older", "truncated"])
def test_ckpt_path_last_resumes_from_the_newest_complete_checkpoint(tmp_path, good, last_state, capsys, monkeypatch):
    """A kill while saving: the step checkpoint written just before is newer than last.ckpt (whose
    new version stayed a .partial), or a non-atomic writer left last.ckpt cut off. `--ckpt_path last`
    takes the newest complete checkpoint of the run's folder, not the older or broken last.ckpt."""
    from lightning import Trainer
    from helpers import tiny_config

    config = tiny_config(tmp_path)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    last, step = folder / "last.ckpt", folder / "epoch=1-step=8.ckpt"
    last.write_bytes(good.read_bytes() if last_state == "older" else good.read_bytes()[:1000])
    step.write_bytes(good.read_bytes())
    (folder / "last.ckpt.partial").write_bytes(good.read_bytes()[:500])
    os.utime(last if last_state == "older" else step, (1, 1))  # a truncated last.ckpt is the newest file
    resumed = []  # the checkpoint the trainer is handed (training itself is not the point here)
    monkeypatch.setattr(Trainer, "fit", lambda self, model, datamodule=None, ckpt_path=None, **kw: resumed.append(ckpt_path))
    with pytest.warns(UserWarning, match="passing over") if last_state == "truncated" else contextlib.nullcontext():
        main(["fit", "--config", str(config), "--ckpt_path", "last"])
    assert resumed == [str(step)]
    assert f"resuming from {step}" in capsys.readouterr().err

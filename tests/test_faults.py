"""Faults: a full disk while saving a checkpoint (an injected ENOSPC at the write) and unreadable
images. Nothing lost (the previous last.ckpt intact), nothing left behind (no *.partial), one line
naming the folder or file; unreadable images skipped only when asked."""
from __future__ import annotations

import errno
import os
import warnings

import pytest
import torch
from PIL import Image

from snnet.checkpoint_io import PARTIAL, read_checkpoint
from snnet.checkpoint_write import AtomicCheckpointIO
from snnet.cli import main
from snnet.data import CheckedImageFolder
from snnet.errors import BadFileError, WriteError


def full_disk(monkeypatch) -> None:
    """torch.save writes some bytes, then the disk is full (as the OS reports it)."""
    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)


def test_full_disk_keeps_last_checkpoint_and_removes_partial(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(3.0)}, "global_step": 4}, last)
    before = last.read_bytes()
    full_disk(monkeypatch)
    with pytest.raises(WriteError) as info:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 8}, last)
    assert str(info.value) == f"cannot write checkpoint last.ckpt in {tmp_path}: No space left on device; the previous last.ckpt is intact"
    assert last.read_bytes() == before and read_checkpoint(last)["global_step"] == 4
    assert not list(tmp_path.glob(f"*{PARTIAL}"))


def test_fit_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    from helpers import tiny_config

    config = tiny_config(tmp_path)
    full_disk(monkeypatch)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--trainer.max_epochs", "1"])
    assert info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("snnet fit: cannot write checkpoint ") and f"in {tmp_path / 'checkpoints'}: No space left on device" in line
    assert not list((tmp_path / "checkpoints").glob(f"*{PARTIAL}"))


@pytest.fixture
def folder_with_bad_images(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (50 * i, 0, 0)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "a" / "1.png").write_bytes((tmp_path / "a" / "0.png").read_bytes()[:40])  # truncated
    (tmp_path / "b" / "2.png").write_bytes(b"not an image")
    return tmp_path


def test_unreadable_image_names_the_file(folder_with_bad_images):
    dataset = CheckedImageFolder(folder_with_bad_images, transform=None)
    with pytest.raises(BadFileError, match=rf"image {folder_with_bad_images / 'a' / '1.png'} cannot be read .*skip_unreadable"):
        dataset[1]


def test_skip_unreadable_skips_counts_and_names_them(folder_with_bad_images, caplog):
    dataset = CheckedImageFolder(folder_with_bad_images, transform=None, skip_unreadable=True)
    items = [dataset[i] for i in range(len(dataset))]
    bad = {str(folder_with_bad_images / "a" / "1.png"), str(folder_with_bad_images / "b" / "2.png")}
    assert dataset.skipped == bad
    assert all(isinstance(image, Image.Image) for image, _ in items)  # the next readable image in their place
    assert items[1][0].getpixel((0, 0)) == (100, 0, 0) and items[5][0].getpixel((0, 0)) == (0, 0, 0)
    assert all(path in caplog.text for path in bad)


def test_schedule_change_names_what_changed():
    from snnet.optim import schedule_change

    saved = {"total_steps": 240, "warmup_steps": 10, "min_lr": 1e-6}
    assert schedule_change(saved, dict(saved)) is None and schedule_change(None, saved) is None
    message = schedule_change(saved, {**saved, "total_steps": 480})
    assert message.startswith("resuming with another learning-rate schedule than the checkpoint's (total_steps 240 -> 480)")


def schedule_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "learning-rate schedule" in str(w.message)]


def test_resume_with_another_max_steps_warns_that_the_schedule_changes(tmp_path):
    """Real fits: 4 steps, resumed to 8 (warns 4 -> 8), then resumed from that run's step-6 checkpoint
    (saved under the 8-step schedule) with the same max_steps (no warning)."""
    from helpers import tiny_config

    config, checkpoints = str(tiny_config(tmp_path)), tmp_path / "checkpoints"
    main(["fit", "--config", config, "--trainer.max_steps", "4"])
    with pytest.warns(UserWarning) as record:
        main(["fit", "--config", config, "--trainer.max_steps", "8", "--ckpt_path", "last"])
        warnings.warn("resumed", UserWarning)  # pytest.warns needs one; the assertion is on the list
    assert schedule_warnings(record) == [
        "resuming with another learning-rate schedule than the checkpoint's (total_steps 4 -> 8): the rest of the run "
        "follows the new schedule from the resumed step, so it differs from an uninterrupted run of either length"]
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 8
    with pytest.warns(UserWarning) as record:
        main(["fit", "--config", config, "--trainer.max_steps", "8", "--ckpt_path", str(checkpoints / "epoch=0-step=6.ckpt")])
        warnings.warn("resumed", UserWarning)
    assert schedule_warnings(record) == []
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 8


def test_skipped_images_are_counted_across_loader_workers(tmp_path, caplog):
    """A real fit with 2 loader workers over a folder with 3 unreadable images (2 train, 1 val):
    the end-of-run report counts all 3 although the workers, not this process, read them."""
    import lightning as L

    from helpers import tiny_module
    from snnet.data import ImageFolderDataModule

    bad = []
    for split, per_class, broken in (("train", 6, ("a/1.png", "b/4.png")), ("val", 4, ("b/0.png",))):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(tmp_path / split / label / f"{i}.png")
        for name in broken:
            (tmp_path / split / name).write_bytes(b"not an image")
            bad.append(str(tmp_path / split / name))
    module = tiny_module()
    data = ImageFolderDataModule(str(tmp_path), skip_unreadable=True, data_config=module.data_config, batch_size=4,
                                 num_workers=2, train_transform="eval")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    assert data.train_set.skipped | data.val_set.skipped == set(bad)
    assert f"skipped 3 unreadable images (skip_unreadable: true), e.g. {', '.join(sorted(bad))}" in caplog.text

"""A callback that SIGKILLs its own process at a chosen point of `snnet fit` (for the kill/resume
tests): no clean-up, no final checkpoint, exactly like `kill -9` from outside."""
from __future__ import annotations

import os
import signal

import lightning as L


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(L.Callback):
    """``point``: ``train_batch`` (after the optimizer step of ``step``, before its checkpoint),
    ``epoch_start`` (epoch ``epoch`` begins: the previous epoch's checkpoint is written),
    ``validation`` (a validation batch of epoch ``epoch``, not the sanity check) or ``save``
    (inside the ``save``-th checkpoint write, after the file was opened)."""

    def __init__(self, point: str, step: int = -1, epoch: int = -1, save: int = -1) -> None:
        self.point, self.step, self.epoch, self.save = point, step, epoch, save
        self.saves = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.point == "train_batch" and trainer.global_step == self.step:
            die()

    def on_train_epoch_start(self, trainer, module) -> None:
        if self.point == "epoch_start" and trainer.current_epoch == self.epoch:
            die()

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.point == "validation" and not trainer.sanity_checking and trainer.current_epoch == self.epoch:
            die()

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        self.saves += 1
        if self.point == "save" and self.saves == self.save:
            checkpoint["kill_switch"] = _DieWhenPickled()


class _DieWhenPickled:
    """Pickled after the checkpoint file was created, before its end was written."""

    def __reduce__(self):
        die()

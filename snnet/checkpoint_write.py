"""Checkpoint files that survive a kill.

:class:`AtomicCheckpointIO` (the default of ``snnet fit``) writes ``<name>.partial`` beside the
target, flushes it to disk and renames it over the target: a run killed while saving leaves the
previous ``last.ckpt`` whole. (Lightning's own writer stages the bytes in the system temp folder
and moves them, which turns into a non-atomic copy when that folder is on another file system.)
A failed write (a full disk) removes the ``.partial`` and raises one line naming the folder.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from snnet.checkpoint_io import PARTIAL, read_checkpoint
from snnet.errors import WriteError


def _os_reason(error: BaseException, folder: Path) -> str:
    """The operating system's reason for a failed write (``No space left on device``), also where
    torch wraps it in a RuntimeError (``unexpected pos ...``) that does not say the disk is full."""
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    try:
        if shutil.disk_usage(folder).free == 0:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to ``<path>.partial``, fsyncs, renames over ``path``; reads with :func:`read_checkpoint`.
    Remote (fsspec URL) paths fall back to Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        partial = path.with_name(path.name + PARTIAL)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write (ENOSPC) as a RuntimeError
            partial.unlink(missing_ok=True)  # a partial file would keep the disk full
            raise WriteError(f"cannot write checkpoint {path.name} in {path.parent}: {_os_reason(e, path.parent)}"
                             + (f"; the previous {path.name} is intact" if path.exists() else "")) from e
        os.replace(partial, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself reaches the disk
        finally:
            os.close(directory)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Callable | Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return read_checkpoint(path, map_location, weights_only, load=super().load_checkpoint)

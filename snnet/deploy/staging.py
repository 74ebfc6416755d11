"""Output folders written whole or not at all: files go to a hidden sibling folder that is renamed
into place only once everything in it was written and checked."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from snnet.errors import WriteError


def check_free(out: str | os.PathLike) -> Path:
    """``out`` as a path, or a clear error when it is a file or a non-empty folder (never overwritten)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WriteError(f"{out} exists and is not an empty folder: give a new output folder (nothing was written)")
    return out


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success rename it to ``out``, on any error remove it."""
    out = check_free(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as e:  # a file in the way, no permission, a read-only or virtual file system
        raise WriteError(f"{out}: cannot create the folder ({e.strerror or e})") from e
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared folder
    try:
        yield tmp
        os.replace(tmp, out)  # atomic; an existing empty folder is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

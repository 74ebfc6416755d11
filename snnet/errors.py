"""snnet's errors for bad input and faults, and the one line the command line prints for them.

Every error a user can cause (a bad value, a file that cannot be used, a place that cannot be
written) is one of :data:`USER_ERRORS`; ``snnet`` prints :func:`one_line` of it on stderr and exits
with code 2 instead of showing a traceback (``snnet.cli.main``).
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Iterable

PACKAGE_DIR = str(Path(__file__).resolve().parent)


class SNNetError(Exception):
    """A bad input or a fault snnet explains in one line (the value or file, what is wrong, what is valid)."""


class BadFileError(SNNetError, ValueError):
    """An input file that exists but cannot be used; the message names it and says why."""


def read_json(path: Path, what: str = "", error: type[BadFileError] = BadFileError) -> Any:
    """The JSON in the file ``path``; unparsable text raises ``error`` naming the file (``what``, e.g.
    ``"results file "``, stands before its path): the one reader of every JSON file snnet is given."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what}{path}: not valid JSON ({e})") from None


def did_you_mean(name: str, choices: Iterable[str], otherwise: str = "") -> str:
    """``"; did you mean one of [...]?"`` with the choices closest to ``name``, else ``otherwise``:
    the one suggestion format for every unknown name (models, keys, stitches)."""
    close = difflib.get_close_matches(name, list(choices), n=5, cutoff=0.5)
    return f"; did you mean one of {close}?" if close else otherwise


class UsageError(SNNetError, ValueError):
    """A command line or config that does not parse: an unknown key, a value of the wrong type."""


class StitchIdError(SNNetError, IndexError):
    """A configuration id outside the network's range; the message gives the valid ids."""


class WriteError(SNNetError, OSError):
    """A place snnet could not write to (full disk, no permission); the message names it and the OS error."""


# FileNotFoundError and its kin carry the path in their message; ValueError is what library code raises for a bad value
USER_ERRORS: tuple[type[BaseException], ...] = (
    SNNetError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
)


def _raised_by_snnet(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(PACKAGE_DIR + os.sep)


def one_line(error: BaseException) -> str:
    """The message of the error snnet raised, on one line.

    Libraries wrap our errors (jsonargparse turns the ``ValueError`` of a model's ``__init__`` into
    a many-line "Does not validate against any of the Union subtypes"): the outermost error of the
    chain raised in snnet's own code carries the message meant for the user.
    """
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    ours = next((e for e in chain if isinstance(e, SNNetError)), None) or next(
        (e for e in chain if isinstance(e, USER_ERRORS) and _raised_by_snnet(e)), error)
    message = str(ours)
    if "Original Traceback" in message:  # re-raised from a DataLoader worker: its last line is the error
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(message.split()) or type(ours).__name__


def writable_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` as an existing folder snnet can write into (created if missing), or a :class:`WriteError` naming it."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise WriteError(f"{what} {folder} is a file, not a folder: give a folder to write into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{what} {folder}: cannot create the folder ({e.strerror or e})") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WriteError(f"{what} {folder}: no permission to write into this folder")
    return folder

"""The error for an input file that cannot be used (checkpoint, results JSON): its message names the
file and what is wrong, and the command line prints it as one line instead of a traceback."""
from __future__ import annotations

import difflib
from typing import Iterable


class BadFileError(ValueError):
    """An input file that exists but cannot be used; the message names it and says why."""


def did_you_mean(name: str, choices: Iterable[str], otherwise: str = "") -> str:
    """``"; did you mean one of [...]?"`` with the choices closest to ``name``, else ``otherwise``:
    the one suggestion format for every unknown name (models, keys, stitches)."""
    close = difflib.get_close_matches(name, list(choices), n=5, cutoff=0.5)
    return f"; did you mean one of {close}?" if close else otherwise

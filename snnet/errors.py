"""The error for an input file that cannot be used (checkpoint, results JSON): its message names the
file and what is wrong, and the command line prints it as one line instead of a traceback."""


class BadFileError(ValueError):
    """An input file that exists but cannot be used; the message names it and says why."""

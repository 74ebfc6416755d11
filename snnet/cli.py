"""``snnet``: LightningCLI's fit/validate/test/predict plus the project's own subcommands.

The Lightning subcommands go to :class:`snnet.trainer_cli.SNNetCLI`, imported only for them; the
others are thin front ends over library functions (``snnet.commands``). All parse with jsonargparse (:mod:`snnet.arguments`), and
:func:`main` is the one place that turns a bad input or a fault (:data:`snnet.errors.USER_ERRORS`)
into one line on stderr and exit code 2.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from snnet.commands import COMMANDS, LIGHTNING_COMMANDS
from snnet.errors import USER_ERRORS, one_line


def usage() -> str:
    lines = ["usage: snnet <command> [options]   (snnet <command> --help for its options)", "", "commands:"]
    for name, doc in LIGHTNING_COMMANDS.items():
        lines.append(f"  {name:<11} {doc}")
    for name, (_, doc) in COMMANDS.items():
        lines.append(f"  {name:<11} {doc}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    command = argv[0]
    try:
        if command in LIGHTNING_COMMANDS:
            from snnet.trainer_cli import build_cli

            build_cli(None if from_command_line else argv)
        elif command in COMMANDS:
            COMMANDS[command][0](argv[1:])
        else:
            valid = ", ".join([*LIGHTNING_COMMANDS, *COMMANDS])
            print(f"snnet: unknown command {command!r}; choose one of: {valid} (snnet --help says what each does)", file=sys.stderr)
            raise SystemExit(2)
    except USER_ERRORS as e:  # the one error path: a bad input or a fault is one line, not a traceback
        name = " ".join(argv[:2]) if command == "bench" and argv[1:2] and not argv[1].startswith("-") else command
        print(f"snnet {name}: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from e

if __name__ == "__main__":
    main()

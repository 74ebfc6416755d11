"""The one argument parser of every ``snnet`` command: jsonargparse (as LightningCLI), raising one line.

jsonargparse prints its usage and a many-line message for a bad option (an unknown key inside a
model's ``init_args`` is a 60-line dump that never lists the valid keys). :func:`parse`
raises :class:`~snnet.errors.UsageError` instead, whose message names the key, the valid keys at
that level and the closest one; ``snnet.cli.main`` prints it like every other error.
"""
from __future__ import annotations

import difflib
import re
from argparse import ArgumentError
from typing import Any, Iterable, Sequence

from jsonargparse import ArgumentParser, Namespace

from snnet.errors import UsageError

UNKNOWN_KEY = [  # the unknown key in jsonargparse's messages (with the group it was given under)
    re.compile(r"unrecognized arguments: (?:\S+ )*?--(?P<key>[\w.-]+)"),
    re.compile(r"Group '(?P<group>[\w.]+)' does not accept option '(?P<key>[\w.]+)'"),
    re.compile(r"Option '(?P<key>[\w.]+)' is not accepted"),
    re.compile(r"Subcommand '\w+' does not accept option '(?P<key>[\w.]+)'"),
]
CLASS_PROBLEM = re.compile(
    r"Parser key \"(?P<parent>[\w.]+)\":.*?Problem with given class_path '(?P<cls>[\w.]+)':\s*(?P<inner>.*?)(?:\n\s*- |\Z)", re.S)


def option_keys(parser: ArgumentParser) -> set[str]:
    """Every key ``parser`` accepts (dotted, as in a config file)."""
    return {a.dest for a in parser._actions
            if a.option_strings and a.dest not in ("help", "config", "print_config", "print_shtab") and not a.dest.startswith("==")}


def class_keys(class_path: str) -> set[str]:
    """The keys a class's ``init_args`` accept (nested dataclass fields dotted)."""
    from jsonargparse._util import import_object

    probe = ArgumentParser()
    probe.add_class_arguments(import_object(class_path), "x")
    return {k[2:] for k in option_keys(probe) if k.startswith("x.")}


def unknown_key_line(key: str, known: Iterable[str], where: str = "") -> str:
    """``unknown key 'a.b'``: the keys valid at the level where it went wrong, and the closest one."""
    parts, split = key.replace("-", "_").split("."), [k.replace("-", "_").split(".") for k in known]
    depth, level = 0, []
    for depth in range(len(parts) - 1, -1, -1):
        level = sorted({k[depth] for k in split if k[:depth] == parts[:depth] and len(k) > depth})
        if level:
            break
    prefix = ".".join([where, *parts[:depth]]).strip(".")
    bad = parts[depth]
    close = (sorted((k for k in level if bad.startswith(k) or k.startswith(bad)), key=lambda k: abs(len(k) - len(bad)))
             or difflib.get_close_matches(bad, level, n=1, cutoff=0.5))
    hint = f"; did you mean {'.'.join([prefix, close[0]]).strip('.')!r}?" if close else ""
    return f"unknown key {'.'.join([where, key]).strip('.')!r}; valid keys{' of ' + prefix if prefix else ''}: {', '.join(level)}{hint}"


def argument_line(parser: ArgumentParser, message: str) -> str:
    """jsonargparse's (often many-line) parse error as one line; for an unknown key, the valid keys and the closest."""
    problem = CLASS_PROBLEM.search(message)
    scope, known, text = "", option_keys(parser), message
    if problem:
        text = problem["inner"]
        scope = f"{problem['parent'].split('.')[-1]}.init_args"
        try:
            known = class_keys(problem["cls"])
        except (ImportError, AttributeError, ValueError):  # the class does not import: say so
            return f"{problem['parent']}.class_path {problem['cls']!r}: {' '.join(text.split())}"
    for pattern in UNKNOWN_KEY:
        found = pattern.search(text)
        if found:
            key = ".".join(filter(None, [found.groupdict().get("group"), found["key"]]))
            return unknown_key_line(key, known, scope)
    typed = re.match(r'Parser key "(?P<key>[\w.]+)"', text)
    value = re.search(r"(?:Given|Got) value: (?P<value>.*)", text)
    if typed and value:  # a value of the wrong type: the key, the types it takes and the value
        kinds = [k for k in re.findall(r"Expected a <class '(\w+)'>", text) if k != "NoneType"]
        return f"{'.'.join([scope, typed['key']]).strip('.')}: expected {' or '.join(dict.fromkeys(kinds)) or 'another value'}, got {value['value'].strip()!r}"
    return " ".join(re.sub(r'Parser key "([\w.]+)":', r"\1:", text).split())


def new_parser(prog: str, description: str, **kwargs: Any) -> ArgumentParser:
    """A jsonargparse parser that raises its errors (for :func:`parse`) instead of printing usage and exiting."""
    return ArgumentParser(prog=prog, description=description, default_env=False, exit_on_error=False, **kwargs)


def parse(parser: ArgumentParser, argv: Sequence[str]) -> Namespace:
    """``parser.parse_args``; a bad option raises :class:`~snnet.errors.UsageError` with one line."""
    try:
        return parser.parse_args(list(argv))
    except ArgumentError as e:
        raise UsageError(argument_line(parser, str(e))) from e

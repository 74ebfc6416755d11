"""What every deployment benchmark reports the same way: machine, versions, command, timing, the
Markdown section appended to BENCHMARKS.md."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def run_meta(**extra: object) -> dict:
    """What a benchmark's JSON records of its run: date, machine and its load average, versions, command."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": os.getloadavg(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
            "torch": torch.__version__, "command": " ".join(["python", *sys.argv]), **extra}


def header_lines(title: str, argv: Sequence[str] | None) -> list[str]:
    """Section title, date, machine (with the load average: the machine may be shared), versions, command."""
    import timm

    args = list(sys.argv[1:] if argv is None else argv)
    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    command = " ".join(shlex.quote(a) for a in ["python", str(script), *args])
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU used"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"## {title}",
        "",
        f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {gpu}; "
        f"load average at start {load} (shared machine: other jobs run beside the benchmark)",
        f"- torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}",
        f"- command: `{(env + ' ') if env else ''}{command}`",
        "",
    ]


@dataclass(frozen=True)
class Seconds:
    """Wall time, and this process's CPU time: on a shared machine other jobs inflate the first
    (waiting for a core) but hardly the second, so single-threaded comparisons read it as well."""

    wall: float
    cpu: float


def timed(fn: Callable[[], T]) -> tuple[Seconds, T]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return Seconds(time.perf_counter() - wall, time.process_time() - cpu), out


def append_section(path: Path | None, lines: list[str]) -> str:
    """Print the section and, with ``path``, append it to that Markdown file (created if missing)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(("\n" if path.stat().st_size else "# Benchmarks\n\n") + text)
    return text

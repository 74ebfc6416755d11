"""`snnet serve` as a child process on a free loopback port, for load tests and end-to-end tests:
start it, wait until ``/health`` answers, or fail saying how it ended."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(args: Sequence[str], env: dict[str, str], timeout: float = 600.0, headers: dict[str, str] | None = None,
                **popen: Any) -> tuple[subprocess.Popen, str]:
    """``python -m snnet.cli serve <args> --port <free>``; returns the process and its URL once
    ``/health`` answers 200. Raises ``RuntimeError`` (the process killed) when it exits or stays
    unhealthy for ``timeout`` s; ``popen``: more ``subprocess.Popen`` options (``stdout``, ...)."""
    import requests

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "snnet.cli", "serve", *args, "--port", str(port)], env=env, **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"snnet serve {' '.join(args)} exited with {proc.returncode}")
        try:
            if requests.get(url + "/health", headers=headers, timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    if popen.get("start_new_session"):  # LitServe's worker processes are in its group
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()
    proc.wait()
    raise RuntimeError(f"snnet serve {' '.join(args)} not healthy after {timeout} s")

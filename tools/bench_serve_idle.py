"""What an idle `snnet serve` holds: memory (RSS, PSS, USS) and CPU of every process of its tree,
next to a bare LitServe server (a trivial LitAPI, no torch model, the same LitServe settings) as the
floor of what LitServe itself needs.

RSS counts every page a process maps, so pages shared after a fork are counted once per process;
PSS splits each shared page among the processes that map it (the tree's PSS sum is what it really
holds); USS is what only that process holds (what ending it would free). Read from
``/proc/<pid>/smaps_rollup`` (Linux), CPU from ``/proc/<pid>/stat`` over ``--idle-s`` seconds idle.

    python tools/bench_serve_idle.py --ckpt outputs/quickstart/checkpoints/last.ckpt \\
        --results outputs/quickstart/fit_results.json

``--bare`` measures only the bare LitServe server; ``--serve-args`` passes more snnet serve options.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import litserve as ls  # noqa: E402

from snnet.serve.process import free_port  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from each process's parent in /proc/<pid>/stat)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def memory_kb(pid: int) -> dict[str, int]:
    """RSS, PSS and USS (private clean + dirty) in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return {"rss": fields["Rss"], "pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(stat[11]) + int(stat[12])  # utime + stime


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def listening_inode(port: int) -> str | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":  # LISTEN
                return cols[9]
    return None


def manager_listener_inodes() -> set[str]:
    """Sockets listening on a ``pymp-*`` path: the multiprocessing Manager's (/proc/net/unix)."""
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 8 and "pymp-" in cols[7] and int(cols[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
            inodes.add(cols[6])
    return inodes


def role(pid: int, root: int, port: int) -> str:
    """What the process is in LitServe's layout (spawned ones by their command line, forked ones by
    the socket they listen on: the Manager on its pymp-* Unix socket, uvicorn on the HTTP port)."""
    if pid == root:
        return "main (start-up checks, ZeroMQ broker thread, worker monitor)"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    if "resource_tracker" in cmdline:
        return "multiprocessing resource tracker"
    if "spawn_main" in cmdline:
        return "inference worker (spawned)"
    sockets = socket_inodes(pid)
    if sockets & manager_listener_inodes():
        return "multiprocessing Manager (forked: request queue, worker status)"
    if listening_inode(port) in sockets:
        return "HTTP server (uvicorn, forked)"
    return "other"


def measure_tree(root: int, port: int, idle_s: float) -> list[dict]:
    pids = [root, *children(root)]
    before = {p: cpu_ticks(p) for p in pids}
    time.sleep(idle_s)
    rows = []
    for pid in pids:
        mem = memory_kb(pid)
        threads = len(os.listdir(f"/proc/{pid}/task"))
        cpu_pct = 100 * (cpu_ticks(pid) - before[pid]) / TICKS / idle_s
        rows.append({"pid": pid, "role": role(pid, root, port), **{k: v / 1024 for k, v in mem.items()},
                     "threads": threads, "cpu_pct": cpu_pct})
    return rows


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server not healthy after {timeout} s")


def run_and_measure(command: list[str], port: int, env: dict[str, str], settle_s: float, idle_s: float) -> list[dict]:
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}")
        time.sleep(settle_s)  # start-up work (imports finishing, first collections) out of the window
        return measure_tree(proc.pid, port, idle_s)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Echo(ls.LitAPI):
    """No model: answers its input."""

    def setup(self, device: str) -> None:
        pass

    def predict(self, x):
        return x


def bare_server(port: int) -> None:
    """A LitServe server whose API answers without a model: what LitServe alone holds, with the
    settings snnet serve gives it (one HTTP process, one CPU worker, ZeroMQ transport)."""
    server = ls.LitServer(Echo(max_batch_size=16, batch_timeout=0.002), accelerator="cpu", devices=1, timeout=30,
                          disable_openapi_url=True, fast_queue=True)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False, num_api_servers=1)


def markdown(name: str, rows: list[dict]) -> str:
    lines = [f"{name}:", "", "| process | RSS MB | PSS MB | USS MB | threads | idle CPU % of a core |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['role']} | {r['rss']:.0f} | {r['pss']:.0f} | {r['uss']:.0f} | {r['threads']} | {r['cpu_pct']:.1f} |")
    total = {k: sum(r[k] for r in rows) for k in ("rss", "pss", "uss", "threads", "cpu_pct")}
    lines.append(f"| **all {len(rows)} processes** | **{total['rss']:.0f}** | **{total['pss']:.0f}** | **{total['uss']:.0f}** | "
                 f"**{total['threads']}** | **{total['cpu_pct']:.1f}** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt")
    parser.add_argument("--results")
    parser.add_argument("--idle-s", type=float, default=30.0, help="the idle window CPU time is measured over")
    parser.add_argument("--settle-s", type=float, default=5.0, help="wait after /health answers before the window")
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS of the servers")
    parser.add_argument("--bare", action="store_true", help="only the bare LitServe server")
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)  # the bare server itself, on this port
    parser.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="more snnet serve options (last)")
    parser.add_argument("--out", default="outputs/bench_serve_idle.json")
    args = parser.parse_args()
    if args.bare_server is not None:
        return bare_server(args.bare_server)
    if not args.bare and not (args.ckpt and args.results):
        parser.error("give --ckpt and --results (or --bare)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": args.threads}
    runs = {}
    if not args.bare:
        port = free_port()
        runs["snnet serve"] = run_and_measure(
            [sys.executable, "-m", "snnet.cli", "serve", "--ckpt", args.ckpt, "--results", args.results, "--device", "cpu",
             "--port", str(port), *args.serve_args], port, env, args.settle_s, args.idle_s)
    port = free_port()
    runs["bare LitServe (trivial LitAPI)"] = run_and_measure(
        [sys.executable, __file__, "--bare-server", str(port)], port, env, args.settle_s, args.idle_s)
    import torch

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{os.cpu_count()} CPUs, load average "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}", "python": platform.python_version(), "torch": torch.__version__,
            "litserve": ls.__version__, "command": " ".join(["python", *sys.argv]), "idle_s": args.idle_s}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    for name, rows in runs.items():
        print(markdown(name, rows), end="\n\n")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()

"""Everything snnet checks on a GPU, in one call: the CUDA tests, the training step against plain timm,
the one-pass evaluation with JPEG-decoding loader workers, the pretrained CIFAR ResNet family trained
for real, and the serving load test, each part a subprocess under a time budget this script enforces
(a part that fails or runs out of time is reported and the next one runs). Writes ``report.json`` and
``report.md`` (plus the CIFAR Pareto plot and ``logs.tar.gz``) to ``--out``. docs/performance.md.

    python tools/device_check.py --out outputs/device_check           # on the GPU machine, ~9 min
    python tools/device_check.py --smoke --out /tmp/smoke              # every part on the CPU, toy sizes, 2 at once

Wheels in ``--wheels`` (default ``.whl/``, from tools/fetch_device_wheels.sh) are unpacked into the
work folder and put on ``PYTHONPATH`` with the repository: nothing is installed, the machine's own torch
is used. ``--shared`` (default ``.device_shared/``) sets SNNET_DATA_DIR and SNNET_ANCHOR_DIR.
This script imports no torch itself, so a broken environment shows up as failed parts, not a crash.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
PARTS = ("tests", "train-eager", "train-compiled", "eval", "cifar", "serve")
# 480 s: with a machine's start (1-2 min) it leaves a 15-minute lease room for a second, partial try (--parts)
BUDGETS_S = {"tests": 120, "train-eager": 40, "train-compiled": 80, "eval": 60, "cifar": 150, "serve": 30}
SMOKE_BUDGETS_S = dict.fromkeys(PARTS, 240)  # ~10-50 s each on 2 cores; room for a loaded CI machine


@dataclass
class Part:
    """One subprocess: ``argv`` run in ``cwd`` under ``budget_s``; ``read`` turns its outputs into
    figures (a dict) and ``targets`` (name -> (value, met)) after a zero exit."""

    name: str
    argv: list[str]
    budget_s: float
    read: Callable[[], dict]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = REPO


@dataclass
class Outcome:
    name: str
    status: str  # passed | failed | timeout | skipped
    seconds: float
    budget_s: float
    command: str
    figures: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)
    error: str = ""


def unpack_wheels(wheels: Path, site: Path) -> list[str]:
    """Every ``*.whl`` in ``wheels`` unzipped into ``site`` (a wheel is a zip of its installed files)."""
    names = []
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
        names.append(wheel.name)
    return names


def run_part(part: Part, log: Path, base_env: dict[str, str]) -> Outcome:
    """Run ``part`` in its own process group; past its budget the whole group is killed."""
    command = " ".join(shlex.quote(a) for a in part.argv)
    start = time.perf_counter()
    with log.open("w") as out:
        out.write(f"$ {command}\n\n")
        out.flush()
        proc = subprocess.Popen(part.argv, cwd=part.cwd, env={**base_env, **part.env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=part.budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    seconds = time.perf_counter() - start
    if rc is None:
        return Outcome(part.name, "timeout", seconds, part.budget_s, command, error=f"killed after its {part.budget_s:.0f} s budget\n" + tail(log))
    if rc != 0:
        return Outcome(part.name, "failed", seconds, part.budget_s, command, error=f"exit status {rc}\n" + tail(log))
    try:
        figures = part.read()
    except Exception as e:  # noqa: BLE001  (a part whose outputs cannot be read failed; the others go on)
        return Outcome(part.name, "failed", seconds, part.budget_s, command, error=f"outputs unreadable: {e!r}\n" + tail(log))
    targets = figures.pop("targets", {})
    status = "failed" if figures.get("error") else "passed"
    return Outcome(part.name, status, seconds, part.budget_s, command, figures, targets, figures.pop("error", ""))


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# --- the parts ------------------------------------------------------------------------------
def tests_part(work: Path, smoke: bool) -> Part:
    xml = work / "tests.xml"
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(REPO / "tests" / "test_cuda.py"),
            "-m", "cuda and not slow" if smoke else "cuda", f"--junitxml={xml}"]
    if not smoke and importlib.util.find_spec("xdist"):  # the GPU image has pytest-xdist: the subprocess fits overlap
        argv += ["-n", "4"]

    def read() -> dict:
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
        # on the GPU nothing may skip: a skip there means torch saw no GPU
        error = "" if smoke or counts["skipped"] == 0 else f"{counts['skipped']} CUDA tests skipped on the GPU machine"
        return {**counts, "failed": failed, "error": error}

    return Part("tests", argv, 0, read, env={"SNNET_TEST_DEVICE": "cpu" if smoke else "cuda"})


def train_part(work: Path, smoke: bool, compiled: bool) -> Part:
    out = work / f"train-{'compiled' if compiled else 'eager'}.json"
    if smoke:
        sizes = ["--family", "tiny", "--device", "cpu", "--batch-size", "4", "--configs", "3", "--steps", "1", "--rounds", "1",
                 "--lstsq-images", "8"] + (["--compile-backend", "aot_eager"] if compiled else [])
    else:  # DeiT-Ti/S/B at 224 px, batch 128; the anchors and spread stitches (fewer compiled: each costs a compile)
        sizes = ["--family", "deit", "--device", "cuda", "--batch-size", "128", "--configs", "4" if compiled else "6",
                 "--steps", "5", "--rounds", "2" if compiled else "3", "--lstsq-images", "256"]
    argv = [sys.executable, str(REPO / "tools" / "bench_train.py"), *sizes, "--precision", "bf16", "--json", str(out),
            *(["--compile"] if compiled else [])]

    def read() -> dict:
        data = json.loads(out.read_text())
        stitched = [r for r in data["rows"] if not r["is_anchor"]]
        worst = max(r["time_ratio"] for r in stitched) if stitched else None
        return {**data, "targets": {
            "stitched step within 5 % of the plain step (worst time ratio <= 1.05)": (worst, worst is not None and worst <= 1.05),
            "uniform sampling >= 0.95x the FLOPs-weighted plain img/s": (data["uniform"]["ratio"], data["uniform"]["ratio"] >= 0.95),
        }}

    return Part(f"train-{'compiled' if compiled else 'eager'}", argv, 0, read)


def eval_part(work: Path, smoke: bool) -> Part:
    out = work / "eval.json"
    if smoke:
        sizes = ["--family", "tiny", "--img-size", "16", "--images", "8", "--jpeg-size", "64", "48", "--batch-size", "4",
                 "--num-workers", "1", "--repeats", "1", "--device", "cpu"]
    else:  # the 71 DeiT stitches on ImageNet-sized synthetic JPEGs decoded in loader workers
        sizes = ["--family", "deit", "--img-size", "224", "--num-classes", "1000", "--images", "512", "--jpeg-size", "500", "375",
                 "--batch-size", "128", "--num-workers", str(max(1, min(14, (os.cpu_count() or 2) - 2))), "--repeats", "2",
                 "--device", "cuda"]
    argv = [sys.executable, str(REPO / "tools" / "bench_eval.py"), *sizes, "--jpeg-root", str(work / "jpeg"),
            "--json", str(out), "--out", str(work / "eval.md")]

    def read() -> dict:
        (row,) = json.loads(out.read_text())
        ratio = row["end_to_end_ratio"]["wall"]
        return {**row, "error": "" if row["same_predictions"] else "the two modes predicted differently",
                "targets": {"evaluation <= 0.35x end to end (wall)": (ratio, ratio <= 0.35)}}

    return Part("eval", argv, 0, read)


def cifar_part(work: Path, smoke: bool, epochs: int, budget_s: float) -> Part:
    run = work / "cifar"
    if smoke:  # the same tool and config, the family swapped for two random tiny ResNets on the offline digits
        sets = ["model.init_args.network={anchors: [cifar_resnet8, cifar_resnet14], pretrained: false, input_size: [3, 16, 16]}",
                "data={class_path: snnet.data.DigitsDataModule, init_args: {batch_size: 16, train_limit: 64, val_limit: 32, num_workers: 0}}",
                "model.init_args.stitch_init.images=32", "trainer.accelerator=cpu"]
        bound = ["--steps", "2"]
    else:  # the default recipe for `epochs`, validated every 5; max_time stops it inside the budget whatever the speed
        sets = [f"trainer.max_epochs={epochs}", f"trainer.check_val_every_n_epoch={min(5, epochs)}",
                f"trainer.max_time=00:00:{int(budget_s - 45) // 60:02d}:{int(budget_s - 45) % 60:02d}",
                "data.init_args.num_workers=8"]
        bound = []
    argv = [sys.executable, str(REPO / "tools" / "recipe_study.py"), "--config", str(REPO / "configs" / "cifar10_resnet.yaml"),
            "--recipe", "device-check", "--out-dir", str(run), "--out", str(work / "cifar.jsonl"), *bound,
            *[a for s in [*sets, "trainer.enable_checkpointing=true"] for a in ("--set", s)]]

    def read() -> dict:
        row = json.loads((work / "cifar.jsonl").read_text().splitlines()[-1])
        fig = row["figures"]
        ckpts = sorted(run.glob("**/*.ckpt"))
        epochs_done = last_epoch(run)
        change = max((abs(v) for v in fig.get("anchor_change", {}).values()), default=None)
        return {"figures": fig, "wall_s": row["wall_s"], "epochs_trained": epochs_done, "checkpoint": str(ckpts[-1]) if ckpts else None,
                "results": str(run / "fit_results.json"), "pareto": str(run / "fit_pareto.png"), "targets": {
                    "at least half the stitches on the front": (f"{fig['on_front']} of {fig['stitches']}", 2 * fig["on_front"] >= fig["stitches"]),
                    "no stitch more than 1 point below its lower anchor": (fig["below_lower"], fig["below_lower"] == 0),
                    "median gap >= 0": (fig["median_gap"], fig["median_gap"] is not None and fig["median_gap"] >= 0),
                    "anchors within 1 point of their pretrained top-1": (change, change is not None and change <= 1.0),
                }}

    return Part("cifar", argv, 0, read, cwd=work)


def last_epoch(run: Path) -> int | None:
    """Epochs trained, from the CSV logger's metrics (its largest ``epoch`` + 1)."""
    epochs = []
    for metrics in run.glob("logs/**/metrics.csv"):
        lines = metrics.read_text().splitlines()
        column = lines[0].split(",").index("epoch") if lines and "epoch" in lines[0].split(",") else None
        if column is not None:
            epochs += [int(float(line.split(",")[column])) for line in lines[1:] if line.split(",")[column]]
    return max(epochs) + 1 if epochs else None


def serve_part(work: Path, smoke: bool, cifar: Outcome | None) -> Part | str:
    """`tools/bench_serve.py` on the CIFAR part's checkpoint, or why it cannot run."""
    if cifar is None or cifar.status != "passed" or not cifar.figures.get("checkpoint"):
        return "needs the cifar part's checkpoint and results, and that part did not pass"
    out = work / "serve.json"
    if smoke:
        sizes = ["--device", "cpu", "--policies", "slo", "--steps", "2", "--requests", "6", "--warmup", "2", "--slo-ms", "1000",
                 "--image-size", "16"]
    else:
        sizes = ["--device", "cuda", "--steps", "1", "4", "16", "4", "1", "--requests", "160", "--slo-ms", "20", "--image-size", "32"]
    argv = [sys.executable, str(REPO / "tools" / "bench_serve.py"), "--ckpt", cifar.figures["checkpoint"],
            "--results", cifar.figures["results"], "--out", str(out), *sizes]

    def read() -> dict:
        rows = json.loads(out.read_text())["rows"]
        errors = sum(r["errors"] for r in rows)
        return {"rows": rows, "error": f"{errors} requests failed" if errors else ""}

    return Part("serve", argv, 0, read)


# --- the report -----------------------------------------------------------------------------
def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "timm", "lightning", "torchmetrics", "litserve", "jsonargparse"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "no GPU"
    except (OSError, subprocess.SubprocessError):
        return "no GPU (nvidia-smi not found)"


def markdown(meta: dict, outcomes: list[Outcome]) -> str:
    lines = [f"# snnet device check ({'smoke, CPU' if meta['smoke'] else 'GPU'})", "",
             f"- date: {meta['date']}; machine: {meta['gpu']}, {meta['cpus']} CPUs; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
             f"- command: `{meta['command']}`; wheels unpacked: {len(meta['wheels'])}; total {meta['seconds']:.0f} s", "",
             "| part | status | seconds | budget s |", "|---|---|---:|---:|"]
    lines += [f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.budget_s:.0f} |" for o in outcomes]
    lines += ["", "## Targets (benchmarks, not tests)", "", "| part | target | value | met |", "|---|---|---|---|"]
    for o in outcomes:
        for target, (value, met) in o.targets.items():
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            lines.append(f"| {o.name} | {target} | {shown} | {'yes' if met else '**no**'} |")
    for o in outcomes:
        lines += ["", f"## {o.name}: {o.status}", "", f"`{o.command}`", ""]
        if o.name.startswith("train") and "rows" in o.figures:
            lines += ["| id | configuration | GFLOPs | SN-Net img/s | plain img/s | time ratio |", "|---:|---|---:|---:|---:|---:|"]
            lines += [f"| {r['id']} | {r['name']} | {r['gflops']:.2f} | {r['stitchable_img_s']:.0f} | {r['plain_img_s']:.0f} | "
                      f"{r['time_ratio']:.3f} |" for r in o.figures["rows"]]
            u = o.figures["uniform"]
            lines += ["", f"Uniform sampling: {u['stitchable_img_s']:.0f} img/s against the FLOPs-weighted plain "
                          f"{u['plain_img_s']:.0f} img/s ({u['ratio']:.3f}x)."]
        elif o.name == "eval" and "end_to_end_ratio" in o.figures:
            f = o.figures
            lines.append(f"{f['stitches']} stitches, {f['images']} images: end to end {f['end_to_end_ratio']['wall']:.3f}x (wall), "
                         f"compute only {f['compute_ratio']['wall']:.3f}x, FLOPs {f['flops_ratio']:.3f}x; same predictions: "
                         f"{f['same_predictions']}. {f['note']}")
        elif o.name == "cifar" and "figures" in o.figures:
            f = o.figures
            lines.append(f"{f['epochs_trained']} epochs in {f['wall_s']:.0f} s; figures: " + json.dumps(f["figures"]))
        elif o.name == "serve" and "rows" in o.figures:
            lines += ["| policy | step | clients | req/s | p50 ms | p95 ms | over SLO % | expected top-1 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
            lines += [f"| {r['policy']} | {r['step']} | {r['clients']} | {r['throughput_rps']:.0f} | {r['p50_ms']:.1f} | "
                      f"{r['p95_ms']:.1f} | {r['slo_violations_pct']:.0f} | {r['expected_acc1']:.2f} |" for r in o.figures["rows"]]
        elif o.name == "tests" and "tests" in o.figures:
            f = o.figures
            lines.append(f"{f['tests']} tests: {f['failures']} failures, {f['errors']} errors, {f['skipped']} skipped {f['failed'] or ''}")
        if o.error:
            lines += ["", "```", o.error[-4000:], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="parts: " + ", ".join(PARTS))
    parser.add_argument("--out", type=Path, required=True, help="report.json, report.md, cifar_pareto.png, logs.tar.gz")
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU at toy sizes (CI)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="a subset (a rerun of what failed)")
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS", help="another time budget for a part")
    parser.add_argument("--jobs", type=int, help="parts run at once (default 1, 2 with --smoke: on the GPU parts would slow each other)")
    parser.add_argument("--cifar-epochs", type=int, default=30, help="epochs of the CIFAR family (max_time stops it within its budget)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "snnet_device_check",
                        help="working folder, emptied first (outside --out: only the report comes back from a device)")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="wheels to unpack onto PYTHONPATH (if the folder exists)")
    parser.add_argument("--shared", type=Path, default=REPO / ".device_shared", help="holds data/ and anchors/ (if it exists)")
    args = parser.parse_args(argv)
    budgets = dict(SMOKE_BUDGETS_S if args.smoke else BUDGETS_S)
    args.jobs = args.jobs or (2 if args.smoke else 1)
    for item in args.budget:
        name, sep, seconds = item.partition("=")
        if name not in PARTS or not sep:
            parser.error(f"--budget expects PART=SECONDS with PART one of {', '.join(PARTS)}; got {item!r}")
        budgets[name] = float(seconds)

    start = time.perf_counter()
    out = args.out.resolve()
    work = args.work.resolve()
    logs = work / "logs"
    shutil.rmtree(work, ignore_errors=True)
    logs.mkdir(parents=True)
    site = work / "site"
    wheels = unpack_wheels(args.wheels, site) if args.wheels.is_dir() else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(REPO), *([str(site)] if wheels else []), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if (args.shared / "data").is_dir():
        env.setdefault("SNNET_DATA_DIR", str((args.shared / "data").resolve()))
        env.setdefault("SNNET_ANCHOR_DIR", str((args.shared / "anchors").resolve()))
    if args.smoke:
        env.setdefault("OMP_NUM_THREADS", "1")

    def build(name: str, by_name: dict[str, Outcome]) -> Part | str:
        if name == "tests":
            return tests_part(work, args.smoke)
        if name.startswith("train"):
            return train_part(work, args.smoke, compiled=name == "train-compiled")
        if name == "eval":
            return eval_part(work, args.smoke)
        if name == "cifar":
            return cifar_part(work, args.smoke, args.cifar_epochs, budgets["cifar"])
        return serve_part(work, args.smoke, by_name.get("cifar"))

    def execute(name: str, by_name: dict[str, Outcome]) -> Outcome:
        part = build(name, by_name)
        if isinstance(part, str):
            outcome = Outcome(name, "skipped", 0.0, budgets[name], "", error=part)
        else:
            part.budget_s = budgets[name]
            print(f"[device_check] {name}: started, budget {part.budget_s:.0f} s", flush=True)
            outcome = run_part(part, logs / f"{name}.log", env)
        print(f"[device_check] {name}: {outcome.status} in {outcome.seconds:.0f} s" + (f"\n{outcome.error[-2000:]}" if outcome.error else ""),
              flush=True)
        return outcome

    by_name: dict[str, Outcome] = {}

    def chain(names: list[str]) -> None:  # serve reads the cifar part's checkpoint: it runs right after it
        for name in names:
            by_name[name] = execute(name, by_name)

    # the longest chain first, so that running parts at once shortens the whole
    chains = [[n for n in ("cifar", "serve") if n in args.parts]] + [[n] for n in args.parts if n not in ("cifar", "serve")]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(chain, [c for c in chains if c]))
    outcomes = [by_name[n] for n in args.parts]

    meta = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "smoke": args.smoke, "gpu": gpu_name(),
            "cpus": os.cpu_count(), "versions": versions(), "wheels": wheels, "seconds": time.perf_counter() - start,
            "command": " ".join(shlex.quote(a) for a in ["python", "tools/device_check.py", *(sys.argv[1:] if argv is None else argv)])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"meta": meta, "parts": [o.__dict__ for o in outcomes]}, indent=1, default=str))
    (out / "report.md").write_text(markdown(meta, outcomes))
    pareto = work / "cifar" / "fit_pareto.png"
    if pareto.is_file():
        shutil.copy(pareto, out / "cifar_pareto.png")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as archive:  # part logs and outputs, not the JPEGs, wheels or checkpoints
        for path in work.rglob("*"):
            if path.is_file() and not path.is_relative_to(site) and not path.is_relative_to(work / "jpeg") and path.suffix != ".ckpt":
                archive.add(path, arcname=str(path.relative_to(work)))
    print((out / "report.md").read_text())
    return 0 if all(o.status == "passed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

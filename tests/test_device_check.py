"""tools/device_check.py, the one-call GPU check, kept from rotting between GPU runs: its --smoke mode
runs every part (the same tools, toy sizes, CPU) and the report must hold every part, passed; a part
that fails or outlives its budget is reported and the next one still runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from device_check import PARTS, Part, run_part  # noqa: E402


@pytest.mark.slow
def test_smoke_runs_every_part_and_reports_each(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "device_check.py"), "--smoke", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--wheels", str(tmp_path / "no-wheels"),
                           "--shared", str(tmp_path / "no-shared")], capture_output=True, text=True, timeout=900)
    report = json.loads((out / "report.json").read_text())
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == list(PARTS)
    assert all(p["status"] == "passed" for p in parts.values()), {n: p["error"][-2000:] for n, p in parts.items() if p["status"] != "passed"}
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert parts["tests"]["figures"]["tests"] >= 7 and parts["tests"]["figures"]["skipped"] == 0  # the CUDA tests' logic ran on the CPU
    for name in ("train-eager", "train-compiled"):
        assert {r["is_anchor"] for r in parts[name]["figures"]["rows"]} == {True, False}  # anchors and a stitch timed
        assert parts[name]["figures"]["uniform"]["plain_img_s"] > 0
    assert parts["eval"]["figures"]["same_predictions"] and parts["eval"]["figures"]["stitches"] == 4
    assert parts["cifar"]["figures"]["figures"]["stitches"] == 2 and parts["cifar"]["figures"]["checkpoint"]
    assert sum(r["requests"] for r in parts["serve"]["figures"]["rows"]) == 6 and (out / "cifar_pareto.png").is_file()
    assert all(len(p["targets"]) > 0 for n, p in parts.items() if n in ("train-eager", "train-compiled", "eval", "cifar"))
    markdown = (out / "report.md").read_text()
    assert all(f"| {name} | passed |" in markdown for name in PARTS)
    assert (out / "logs.tar.gz").stat().st_size > 0


def test_a_failing_or_overlong_part_is_reported_not_fatal(tmp_path):
    def part(name: str, code: str, budget: float) -> Part:
        return Part(name, [sys.executable, "-c", code], budget, read=lambda: {"answer": 42})

    env = {"PATH": "/usr/bin:/bin"}
    slow = run_part(part("slow", "import time; print('working', flush=True); time.sleep(60)", 1.0), tmp_path / "slow.log", env)
    assert slow.status == "timeout" and slow.seconds < 30 and "working" in slow.error and "1 s budget" in slow.error
    failed = run_part(part("bad", "raise SystemExit('broken input x.yaml')", 30), tmp_path / "bad.log", env)
    assert failed.status == "failed" and "exit status 1" in failed.error and "broken input x.yaml" in failed.error
    good = run_part(part("good", "print('ok')", 30), tmp_path / "good.log", env)
    assert good.status == "passed" and good.figures == {"answer": 42}

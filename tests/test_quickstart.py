"""The README's main job, exactly as the README runs it: pretrain the digit anchors, `snnet fit` the
quickstart config, and check on its own output what the quickstart promises: anchors that differ
in cost and accuracy, and stitches that fill the gap between them as SN-Net's published DeiT results
do. The figures are recomputed here from the result rows, not read from the run's summary."""
import json
import re
import statistics
from pathlib import Path

import pytest

from snnet.cli import main
from snnet.quickstart import pretrain_anchors

CONFIG = Path(__file__).parents[1] / "configs" / "quickstart.yaml"


def on_front(rows: list[dict]) -> set[int]:
    """Ids no strictly cheaper configuration matches or beats."""
    return {r["id"] for r in rows if all(o["acc1"] < r["acc1"] for o in rows if o["flops"] < r["flops"])}


def gap_to_anchor_line(row: dict, anchors: dict[int, dict]) -> float:
    a, b = sorted((anchors[row["front_anchor"]], anchors[row["end_anchor"]]), key=lambda r: r["flops"])
    t = min(max((row["flops"] - a["flops"]) / (b["flops"] - a["flops"]), 0.0), 1.0)
    return row["acc1"] - (a["acc1"] + t * (b["acc1"] - a["acc1"]))


@pytest.mark.slow
def test_quickstart_fills_the_gap_between_its_anchors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config writes under ./outputs/quickstart
    monkeypatch.setenv("WANDB_MODE", "offline")
    pretrained = pretrain_anchors()  # tools/pretrain_quickstart.py's defaults
    main(["fit", "--config", str(CONFIG)])
    out = tmp_path / "outputs" / "quickstart"
    rows = json.loads((out / "fit_results.json").read_text())["stitches"]
    assert [r["id"] for r in rows] == list(range(11)) and all(r["acc1"] is not None for r in rows)
    anchors = {r["id"]: r for r in rows if r["is_anchor"]}
    stitches = [r for r in rows if not r["is_anchor"]]
    names = [anchors[i]["name"] for i in sorted(anchors)]

    # anchors that differ: >= 3 points between the smallest and the largest, >= 2x FLOPs between neighbours
    flops = [anchors[i]["flops"] for i in sorted(anchors)]
    assert all(hi >= 2 * lo for lo, hi in zip(flops, flops[1:])), flops
    assert pretrained[names[-1]] - pretrained[names[0]] >= 3.0, pretrained
    # ... that joint training leaves within a point of their pretrained accuracy
    changes = {n: anchors[i]["acc1"] - pretrained[n] for i, n in zip(sorted(anchors), names)}
    assert all(abs(c) <= 1.0 for c in changes.values()), changes
    # stitches between them: at least half on the front, none more than a point below its lower anchor,
    # median gap to the anchors' line >= 0
    front = on_front(rows)
    assert 2 * sum(r["id"] in front for r in stitches) >= len(stitches), sorted(front)
    below = [r["name"] for r in stitches
             if r["acc1"] < min(anchors[r["front_anchor"]]["acc1"], anchors[r["end_anchor"]]["acc1"]) - 1.0]
    assert not below, below
    gaps = [gap_to_anchor_line(r, anchors) for r in stitches]
    assert statistics.median(gaps) >= 0.0, gaps

    # what the user sees says the same: the summary line, the table's front column, the plot
    summary = re.search(r"(\d+) configurations from [\d.]+ to [\d.]+ GFLOPs, (\d+) of (\d+) stitches on the front", capsys.readouterr().out)
    assert summary and summary.groups() == ("11", str(sum(r["id"] in front for r in stitches)), "8"), summary
    assert (out / "fit_pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "fit_results.csv").is_file() and list(out.glob("**/last.ckpt"))

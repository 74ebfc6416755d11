"""The README's main job end to end, shortened: pretrain the digit anchors, `snnet fit` the
quickstart config, and find the table's results file and the Pareto plot."""
import json
from pathlib import Path

import pytest

from snnet.cli import main
from snnet.quickstart import pretrain_anchors

CONFIG = Path(__file__).parents[1] / "configs" / "quickstart.yaml"


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config writes under ./outputs/quickstart
    monkeypatch.setenv("WANDB_MODE", "offline")
    accuracy = pretrain_anchors(epochs=2)
    assert all(acc > 80.0 for acc in accuracy.values()), accuracy
    main(["fit", "--config", str(CONFIG), "--trainer.max_epochs", "1"])
    out = tmp_path / "outputs" / "quickstart"
    saved = json.loads((out / "fit_results.json").read_text())
    rows = saved["stitches"]
    assert saved["figures"]["configurations"] == 9 and len(saved["figures"]["anchor_change"]) == 3
    assert [r["id"] for r in rows] == list(range(9))
    assert all(r["acc1"] is not None and r["flops"] > 0 for r in rows)
    anchors = [r for r in rows if r["is_anchor"]]
    assert [r["flops"] for r in anchors] == sorted(r["flops"] for r in anchors) and len(anchors) == 3
    assert all(r["acc1"] > 50.0 for r in anchors)  # trained anchors survive the joint training
    assert (out / "fit_pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "fit_results.csv").is_file() and list(out.glob("**/last.ckpt"))

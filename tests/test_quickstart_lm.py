"""The README's LM quickstart, exactly as the README runs it: pretrain the byte-level Llamas, `snnet fit`
the LM quickstart config, and check on its own output what the docs promise: anchors at least 2x apart in
FLOPs per token and in perplexity, stitches whose perplexity lies between their anchors', and a stitch
chosen for a budget that exports standalone and scores the perplexity its row says. Every figure is
recomputed here from the result rows, not read from the run's summary."""
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from snnet.cli import main
from snnet.deploy.export import load_stitch
from snnet.quickstart_lm import QUICKSTART_LM_MAX_BYTES, QUICKSTART_LM_SEQ_LEN, pretrain_lm_anchors
from snnet.text_data import TextDataModule

CONFIG = Path(__file__).parents[1] / "configs" / "quickstart_lm.yaml"


def on_front(rows: list[dict]) -> set[int]:
    """Ids no strictly cheaper configuration matches or beats in perplexity (lower is better)."""
    return {r["id"] for r in rows if all(o["ppl"] > r["ppl"] for o in rows if o["flops"] < r["flops"])}


@torch.inference_mode()
def validation_ppl(module: torch.nn.Module) -> float:
    """The config's validation split (same corpus, cap, split seed and limit), scored by ``module``."""
    data = TextDataModule(corpus="python_stdlib", max_bytes=QUICKSTART_LM_MAX_BYTES, seq_len=QUICKSTART_LM_SEQ_LEN,
                          batch_size=32, val_limit=256)
    data.setup("fit")
    nll, tokens = 0.0, 0
    for x, y in data.val_dataloader():
        nll += float(F.cross_entropy(module(x).flatten(0, 1), y.flatten(), reduction="sum"))
        tokens += y.numel()
    return math.exp(nll / tokens)


@pytest.mark.slow
def test_lm_quickstart_fills_the_perplexity_gap_and_exports_a_stitch(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config reads and writes under ./outputs/quickstart_lm
    monkeypatch.setenv("WANDB_MODE", "offline")
    pretrained = pretrain_lm_anchors()  # tools/pretrain_quickstart_lm.py's defaults
    main(["fit", "--config", str(CONFIG)])
    out = tmp_path / "outputs" / "quickstart_lm"
    rows = json.loads((out / "fit_results.json").read_text())["stitches"]
    assert [r["id"] for r in rows] == list(range(23))
    for r in rows:
        assert {"id", "name", "flops", "params", "is_anchor", "ppl"} <= set(r) and r["ppl"] == pytest.approx(math.exp(r["loss"]))
    anchors = {r["id"]: r for r in rows if r["is_anchor"]}
    stitches = [r for r in rows if not r["is_anchor"]]
    names = [anchors[i]["name"] for i in sorted(anchors)]

    # anchors that differ: >= 2x FLOPs per token between neighbours, perplexity falling with size by >= 1 in all
    flops = [anchors[i]["flops"] for i in sorted(anchors)]
    assert all(hi >= 2 * lo for lo, hi in zip(flops, flops[1:])), flops
    assert [pretrained[n] for n in names] == sorted(pretrained.values(), reverse=True), pretrained
    assert pretrained[names[0]] - pretrained[names[-1]] >= 1.0, pretrained
    # ... that joint training (anchors at 0.1x the learning rate) leaves within 0.3 ppl of pretrained
    changes = {n: anchors[i]["ppl"] - pretrained[n] for i, n in zip(sorted(anchors), names)}
    assert all(abs(c) <= 0.3 for c in changes.values()), changes
    # every stitch's perplexity between its two anchors', and at least 8 of the 20 on the front
    outside = [r["name"] for r in stitches
               if not anchors[r["end_anchor"]]["ppl"] <= r["ppl"] <= anchors[r["front_anchor"]]["ppl"]]
    assert not outside, outside
    front = on_front(rows)
    assert sum(r["id"] in front for r in stitches) >= 8, sorted(front)
    summary = re.search(r"(\d+) configurations from .* GFLOPs per token, (\d+) of (\d+) stitches on the front \(ppl\)",
                        capsys.readouterr().out)
    assert summary and summary.groups() == ("23", str(sum(r["id"] in front for r in stitches)), "20"), summary
    assert (out / "fit_pareto.png").read_bytes()[:4] == b"\x89PNG"

    # the lowest-perplexity configuration within 0.0013 GFLOPs per token, exported, stands alone (no anchor
    # directory) and scores the validation perplexity of its row
    main(["export", "--ckpt", str(out / "checkpoints" / "last.ckpt"), "--results", str(out / "fit_results.json"),
          "--metric", "ppl", "--max-gflops", "0.0013", "--out", str(tmp_path / "export")])
    fits = [r for r in rows if r["flops"] <= 0.0013e9]
    chosen = min(fits, key=lambda r: (r["ppl"], r["flops"]))
    recipe = json.loads((tmp_path / "export" / "stitch.json").read_text())
    assert recipe["id"] == chosen["id"] and not chosen["is_anchor"], (recipe["id"], chosen)
    shutil.rmtree(out / "anchors")
    module = load_stitch(tmp_path / "export")
    assert sum(p.numel() for p in module.parameters()) == chosen["params"]
    assert validation_ppl(module) == pytest.approx(chosen["ppl"], rel=1e-4)

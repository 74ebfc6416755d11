"""What users saved before the layout move still loads: a checkpoint, the YAML config LightningCLI
wrote with the old class_paths, an exported stitch, and the old import paths (tests/fixtures/pre_layout,
written by the code at commit 3a876f3)."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from snnet.deploy.export import load_stitch
from snnet.deploy.load import load_network

FIXTURES = Path(__file__).parent / "fixtures" / "pre_layout"


@pytest.fixture(scope="module")
def old_outputs() -> dict:
    return torch.load(FIXTURES / "old_outputs.pt")


def test_an_old_checkpoint_gives_the_old_outputs(old_outputs):
    net, _ = load_network(FIXTURES / "old_snnet.ckpt")
    net.eval()
    assert [info.name for info in net.infos] == old_outputs["names"]
    with torch.no_grad():
        logits = torch.stack([net(old_outputs["input"], s) for s in range(net.num_configs)])
    torch.testing.assert_close(logits, old_outputs["logits"])


def test_an_old_export_gives_the_old_outputs(old_outputs):
    with torch.no_grad():
        logits = load_stitch(FIXTURES / "export_stitch3")(old_outputs["input"])
    torch.testing.assert_close(logits, old_outputs["export_logits"])


def test_old_import_paths_are_the_new_objects_with_a_future_warning():
    import snnet.sn_net.build
    import snnet.sn_net.module
    import snnet.stitchnet.composition

    with pytest.warns(FutureWarning, match="snnet.module moved to snnet.sn_net.module"):
        import snnet.module as old_module  # noqa: F401
    assert sys.modules["snnet.module"] is snnet.sn_net.module
    assert snnet.sn_net.module.__spec__.name == "snnet.sn_net.module"  # the new module keeps its own spec
    with pytest.warns(FutureWarning, match="snnet.anchors.NetworkConfig moved"):
        from snnet.anchors import NetworkConfig
    assert NetworkConfig is snnet.sn_net.build.NetworkConfig
    with pytest.warns(FutureWarning, match="snnet.stitchnet.compose moved to snnet.stitchnet.composition.compose"):
        from snnet.stitchnet import compose
    assert compose is snnet.stitchnet.composition.compose
    with warnings.catch_warnings(), pytest.raises(ImportError):
        warnings.simplefilter("ignore")
        from snnet.anchors import no_such_name  # noqa: F401


@pytest.mark.slow
def test_snnet_validate_runs_the_old_config_and_checkpoint(tmp_path):
    """The YAML that LightningCLI saved before the move (class_path snnet.module.SNNetModule, ...)
    validates the old checkpoint as a user would run it, and scores every stitch."""
    run = subprocess.run(
        [sys.executable, "-m", "snnet.cli", "validate", "--config", str(FIXTURES / "old_config.yaml"),
         "--ckpt_path", str(FIXTURES / "old_snnet.ckpt"), "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = json.loads((tmp_path / "outputs" / "pre_layout" / "val_results.json").read_text())
    rows = rows["stitches"] if isinstance(rows, dict) else rows
    assert sorted(r["id"] for r in rows) == [0, 1, 2, 3]

"""The `snnet` command: help, `stitches` counts on the real timm architectures, `select`, bad input."""
import json
import subprocess
import sys

import pytest

from snnet.cli import main
from snnet.results import StitchResult, save_results

DEIT = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]


def snnet(*args, check=True):
    return subprocess.run([sys.executable, "-m", "snnet.cli", *args], capture_output=True, text=True, check=check, timeout=300)


def test_help_lists_lightning_and_project_commands():
    out = snnet("--help").stdout
    for command in ("fit", "validate", "test", "predict", "stitches", "select"):
        assert f"\n  {command} " in out


def test_unknown_command_names_the_choices():
    result = snnet("train", check=False)
    assert result.returncode == 2 and "unknown command 'train'" in result.stderr and "fit, validate" in result.stderr


def test_stitches_acceptance_command_writes_71_rows(tmp_path):
    out = tmp_path / "out.json"
    snnet("stitches", "--anchors", *DEIT, "--pretrained", "false", "--json", str(out))
    rows = json.loads(out.read_text())
    assert len(rows) == 71 and [r["id"] for r in rows] == list(range(71))
    assert all({"id", "name", "flops", "params"} <= set(r) for r in rows)
    assert rows[0]["name"] == DEIT[0] and "->" in rows[3]["name"]


@pytest.mark.slow
@pytest.mark.parametrize("options, expected", [
    (["--kernel-size", "1", "--stride", "1"], 27),
    (["--kernel-size", "2", "--stride", "2"], 51),
    (["--kernel-size", "3", "--stride", "1"], 111),
    (["--nearest", "false"], 732),
])
def test_stitches_options_change_the_count(tmp_path, options, expected):
    out = tmp_path / "out.json"
    main(["stitches", "--anchors", *DEIT, "--pretrained", "false", *options, "--json", str(out)])
    assert len(json.loads(out.read_text())) == expected


@pytest.mark.slow
@pytest.mark.parametrize("anchors, expected", [
    (["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224"], 41),
    (["resnet18", "resnet50"], 10),
    (["resnet18", "swin_tiny_patch4_window7_224"], 8),
])
def test_stitches_hierarchical_and_cross_family_counts(tmp_path, anchors, expected):
    out = tmp_path / "out.json"
    main(["stitches", "--anchors", *anchors, "--pretrained", "false", "--json", str(out)])
    assert len(json.loads(out.read_text())) == expected


@pytest.mark.parametrize("args, message", [
    (["--anchors", "deit_tiy_patch16_224"], "unknown anchor model 'deit_tiy_patch16_224'; did you mean"),
    (["--anchors", "cifar_resnet20", "cifar_resnet32", "--kernel-size", "0"], "kernel"),
    (["--anchors", "cifar_resnet20", "cifar_resnet32", "--stitch-stages", "7"], "stitch stages [7] do not exist: these anchors have stages 0..2"),
    (["--anchors", "mobilenetv3_small_100", "mobilenetv3_large_100"], "share no stitchable stage"),
])
def test_stitches_bad_input_is_a_clear_error(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["stitches", *args, "--pretrained", "false"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_select_picks_within_budget_and_explains_an_impossible_one(tmp_path, capsys):
    results = [StitchResult(0, "small", 10**9, 5, True, 70.0), StitchResult(1, "mid", 2 * 10**9, 7, False, 75.0),
               StitchResult(2, "big", 4 * 10**9, 9, True, 80.0)]
    save_results(results, tmp_path / "r.json")
    main(["select", "--results", str(tmp_path / "r.json"), "--max-gflops", "3"])
    assert json.loads(capsys.readouterr().out)["id"] == 1
    with pytest.raises(SystemExit):
        main(["select", "--results", str(tmp_path / "r.json"), "--max-gflops", "0.5"])
    assert "cheapest stitch 0 (small) at 1 gflops" in capsys.readouterr().err

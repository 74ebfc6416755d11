"""Similarity grids: CKA and stitching matrices, pair selection, files, heatmaps, the command."""
import csv
import json
import math
import re

import pytest
import timm
import torch
import yaml

import snnet.models  # noqa: F401  (registers the CIFAR ResNets)
from snnet.general_stitching.adapters import AdapterConfig
from snnet.cka import linear_cka
from snnet.cli import main
from snnet.families import anchor_view
from snnet.general_stitching.similarity import (
    Grid, cka_grid, load_grid, plot_heatmap, point_features, save_grid, select_pairs, stitching_grid,
)

SIZE = (3, 16, 16)


def tiny(name="cifar_resnet8", seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.randn(48, *SIZE), torch.randint(0, 10, (48,))


@pytest.mark.parametrize("estimator", ["minibatch", "full"])
def test_cka_grid_of_a_model_with_itself_has_ones_on_the_diagonal(images, estimator):
    model = tiny("cifar_resnet14")
    grid = cka_grid(model, model, images[0], batch_size=16, estimator=estimator)
    assert grid.values.shape == (7, 7) and grid.values.dtype == torch.float64
    torch.testing.assert_close(grid.values.diagonal(), torch.ones(7, dtype=torch.float64), rtol=0, atol=1e-10)
    assert grid.sender_boundaries == grid.receiver_boundaries == [0, 2, 4, 6]


def test_full_cka_grid_equals_linear_cka_of_the_layer_features(images):
    sender, receiver = tiny("cifar_resnet8"), tiny("cifar_resnet14", seed=1)
    grid = cka_grid(sender, receiver, images[0], estimator="full", pool="mean")
    fx, fy = point_features(anchor_view(sender), images[0], "mean"), point_features(anchor_view(receiver), images[0], "mean")
    assert fx[2].shape == (48, 32)  # mean-pooled: one feature per channel
    for p, q in [(0, 0), (2, 5), (3, 6)]:
        torch.testing.assert_close(grid.values[p, q], linear_cka(fx[p], fy[q]))


def test_pair_sets():
    small, big = anchor_view(tiny("cifar_resnet8")), anchor_view(tiny("cifar_resnet14"))  # 4 and 7 points
    assert len(select_pairs(small, big, "all")) == 4 * 7
    assert select_pairs(small, big, "stages") == [(p, q) for p in (0, 1, 2, 3) for q in (0, 2, 4, 6)]
    assert select_pairs(small, big, "diagonal") == [(0, 0), (1, 2), (2, 4), (3, 6)]
    assert select_pairs(big, small, "diagonal", band=1) == [(0, 0), (1, 0), (1, 1), (2, 1), (3, 1), (3, 2), (4, 2), (5, 2), (5, 3), (6, 3)]
    assert select_pairs(small, big, [[3, 1], [0, 0], [3, 1]]) == [(0, 0), (3, 1)]


def test_bad_pairs_name_the_valid_choices():
    small, big = anchor_view(tiny("cifar_resnet8")), anchor_view(tiny("cifar_resnet14"))
    with pytest.raises(ValueError, match=r"receiver layer 7 is out of range .* valid layers are 0\.\.6"):
        select_pairs(small, big, [[0, 7]])
    with pytest.raises(ValueError, match=r"unknown pair set 'triangle'; choose one of \('all', 'stages', 'diagonal', 'stages\+diagonal'\)"):
        select_pairs(small, big, "triangle")


def test_self_stitching_with_least_squares_has_zero_penalty(images):
    model = tiny("cifar_resnet8")
    (accuracy, penalty), = stitching_grid(model, model, [(1, 1), (2, 2)], [AdapterConfig("linear")], images, images,
                                          steps=0, ls_images=48, input_size=SIZE)
    assert accuracy.measured() == [(1, 1, accuracy.meta["receiver_accuracy"]), (2, 2, accuracy.meta["receiver_accuracy"])]
    assert penalty.measured() == [(1, 1, 0.0), (2, 2, 0.0)]
    assert math.isnan(float(accuracy.values[0, 0])) and accuracy.values.shape == (4, 4)


def test_stitching_grid_trains_each_adapter_on_each_pair(images):
    sender, receiver = tiny("cifar_resnet14"), tiny("cifar_resnet8", seed=1)
    adapters = [AdapterConfig("linear", bn_before=True, bn_after=True), AdapterConfig("bottleneck")]
    grids = stitching_grid(sender, receiver, [(6, 0), (0, 3)], adapters, images, images, steps=2, batch_size=16,
                           ls_images=16, input_size=SIZE)
    assert [g[0].meta["adapter"]["name"] for g in grids] == ["linear", "bottleneck"]
    for accuracy, penalty in grids:
        assert [(p, q) for p, q, _ in accuracy.measured()] == [(0, 3), (6, 0)]
        torch.testing.assert_close(penalty.values, accuracy.meta["receiver_accuracy"] - accuracy.values, equal_nan=True)
        assert set(accuracy.meta["seconds"]) == {"0,3", "6,0"} and set(accuracy.meta["init_accuracy"]) == {"0,3", "6,0"}


def test_grid_files_round_trip_and_heatmap_is_written(tmp_path):
    values = torch.full((4, 3), math.nan, dtype=torch.float64)
    values[0, 0], values[3, 2], values[1, 2] = 0.5, 0.25, 1.0
    grid = Grid("cka", "a", "b", values, [0, 3], [0, 1, 2], {"images": 10})
    save_grid(grid, tmp_path / "g.json", tmp_path / "g.csv")
    loaded = load_grid(tmp_path / "g.json")
    torch.testing.assert_close(loaded.values, values, equal_nan=True)
    assert loaded.measured() == grid.measured() == [(0, 0, 0.5), (1, 2, 1.0), (3, 2, 0.25)]
    rows = list(csv.DictReader(open(tmp_path / "g.csv")))
    assert [(r["sender_layer"], r["receiver_layer"], r["cka"]) for r in rows] == [("0", "0", "0.5"), ("1", "2", "1.0"), ("3", "2", "0.25")]
    png = plot_heatmap(grid, tmp_path / "g.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _config(tmp_path, **stitching) -> str:
    cfg = {
        "sender": {"name": "cifar_resnet14"}, "receiver": {"name": "cifar_resnet8"}, "measure": "both",
        "input_size": list(SIZE), "cka": {"images": 32, "batch_size": 16},
        "stitching": {"adapters": [{"name": "linear", "bn_before": True, "bn_after": True}], "pairs": [[6, 0], [2, 1]],
                      "steps": 1, "batch_size": 16, "test_images": 32, "ls_images": 16, **stitching},
        "out_dir": str(tmp_path / "out"), "wandb": {"enabled": True, "mode": "offline"},
        "data": {"class_path": "snnet.data.DigitsDataModule", "init_args": {"num_workers": 0}},
    }
    path = tmp_path / "similarity.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_similarity_command_writes_matrices_heatmaps_and_wandb_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_SILENT", "true")
    main(["similarity", "--config", _config(tmp_path)])
    out = tmp_path / "out"
    for stem in ("cka", "stitched_accuracy_linear", "stitching_penalty_linear"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.csv").is_file()
    assert len(json.loads((out / "cka.json").read_text())["values"]) == 7  # 7 sender x 4 receiver layers
    assert load_grid(out / "stitched_accuracy_linear.json").values.shape == (7, 4)
    assert list((out / "wandb").glob("offline-run-*"))
    assert "wrote:" in capsys.readouterr().out


@pytest.mark.parametrize("stitching, message", [
    ({"adapters": [{"name": "mlp"}]}, r"unknown adapter 'mlp'; choose one of \['bottleneck', 'conv3x3_relu', 'linear', 'linear_relu'\]"),
    ({"pairs": [[7, 0]]}, r"sender layer 7 is out of range for CifarResNet with 6 blocks: valid layers are 0\.\.6"),
])
def test_similarity_command_rejects_bad_input_with_the_valid_choices(tmp_path, capsys, stitching, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["similarity", "--config", _config(tmp_path, **stitching)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()

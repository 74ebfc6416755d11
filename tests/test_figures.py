"""The four front figures: recomputed on the reference code's published per-stitch results (the
figures its README states), and exact on small hand-made fronts."""
import json
import os
from pathlib import Path

import pytest

from snnet.front import front_figures, front_ids, line_gap
from snnet.results import StitchResult

PUBLISHED_ENV = "SNNET_PUBLISHED_RESULTS"


@pytest.fixture(scope="session")
def published_dir() -> Path:
    path = os.environ.get(PUBLISHED_ENV)
    if not path or not (Path(path) / "snnet_deit_ti_s_b.jsonl").is_file():
        pytest.skip(f"published SN-Net results not found: set {PUBLISHED_ENV} to the folder holding snnet_deit_ti_s_b.jsonl "
                    "(e.g. ../shared/reference/published-results)")
    return Path(path)


def published(path: Path, anchors: int, pair_of) -> list[StitchResult]:
    """The jsonl rows as results; ``pair_of(cfg_id)`` is the pair the reference README gives."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for r in rows:
        is_anchor = r["cfg_id"] < anchors
        front, end = (None, None) if is_anchor else pair_of(r["cfg_id"])
        out.append(StitchResult(r["cfg_id"], str(r["cfg_id"]), r["flops"], r.get("params", 0), is_anchor, r["acc1"],
                                front_anchor=front, end_anchor=end))
    return out


# file, anchors, pair by cfg_id (README table), stitches on the front, of, below the lower anchor, median gap
PUBLISHED = [
    ("snnet_deit_ti_s_b.jsonl", 3, lambda i: (0, 1) if i <= 36 else (1, 2), 37, 68, 0, 0.40),
    ("snnet_resnet18_resnet50.jsonl", 2, lambda i: (0, 1), 6, 8, 0, 1.43),
    ("snnet_resnet18_swin_ti.jsonl", 2, lambda i: (0, 1), 6, 6, 0, 2.58),
    ("snnet_levit_192_256.jsonl", 2, lambda i: (0, 1), 5, 6, 0, -0.04),
    ("snnetv2_deit3_s_l.jsonl", 2, lambda i: (0, 1), 14, 132, None, -1.42),
]


@pytest.mark.parametrize("name, anchors, pair_of, on_front, stitches, below, gap", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_figures(published_dir, name, anchors, pair_of, on_front, stitches, below, gap):
    fig = front_figures(published(published_dir / name, anchors, pair_of))
    assert (fig.on_front, fig.stitches) == (on_front, stitches)
    assert round(fig.median_gap, 2) == gap
    if below is not None:  # the README states no below-count for SN-Netv2
        assert fig.below_lower == below


def r(id, flops, acc1, pair=None):
    return StitchResult(id, f"c{id}", flops, 0, pair is None, acc1, front_anchor=pair and pair[0], end_anchor=pair and pair[1])


def test_line_gap_interpolates_and_clamps():
    low, high = r(0, 100, 70.0), r(1, 300, 80.0)
    assert line_gap(r(2, 200, 76.0, (0, 1)), low, high) == pytest.approx(1.0)  # line at 75
    assert line_gap(r(3, 400, 79.0, (0, 1)), low, high) == pytest.approx(-1.0)  # clamped to the dearer anchor
    assert line_gap(r(4, 50, 71.0, (0, 1)), low, high) == pytest.approx(1.0)  # clamped to the cheaper anchor


def test_figures_on_a_hand_made_family():
    results = [
        r(0, 100, 70.0), r(1, 300, 80.0),
        r(2, 150, 74.0, (0, 1)),  # on the front, line 72.5 -> +1.5
        r(3, 150, 73.0, (0, 1)),  # same FLOPs as 2, beats everything cheaper: counted on the front
        r(4, 250, 68.5, (0, 1)),  # 1.5 below the lower anchor, line 77.5 -> -9.0
        r(5, 320, 81.0, (0, 1)),  # dearer than both, above: front, clamped line 80 -> +1.0
    ]
    fig = front_figures(results, pretrained={0: 71.0, 1: 80.0})
    assert front_ids(results) == {0, 2, 3, 1, 5}
    assert (fig.configurations, fig.stitches, fig.on_front, fig.below_lower) == (6, 4, 3, 1)
    assert fig.median_gap == pytest.approx((0.5 + 1.0) / 2)  # gaps +1.5, +0.5, -9.0, +1.0
    assert fig.anchor_change == {"c0": pytest.approx(-1.0), "c1": pytest.approx(0.0)}
    assert fig.summary().startswith("6 configurations from 0.000 to 0.000 GFLOPs, 3 of 4 stitches on the front, 1 more than 1 point")


def test_figures_need_pairs():
    with pytest.raises(ValueError, match="no front_anchor/end_anchor"):
        front_figures([r(0, 100, 70.0), StitchResult(1, "s", 120, 0, False, 71.0)])
    with pytest.raises(ValueError, match="not among the results"):
        front_figures([r(0, 100, 70.0), r(1, 120, 71.0, (0, 7))])


@pytest.mark.parametrize("name, anchors, on_front", [
    ("snnet_resnet18_resnet50.jsonl", ("resnet18", "resnet50"), 6),
    ("snnet_deit_ti_s_b.jsonl", ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"), 37),
])
def test_published_rows_identify_our_configurations(published_dir, name, anchors, on_front):
    """Our generator's ids are the reference's cfg_ids (multiply-adds agree within 1 %), so its
    published scores land on our stitches (what tools/published_family.py serves); the front on our
    FLOPs is the published one. Rows of another configuration fail, naming the first mismatch."""
    import timm
    import torch

    from snnet.front import published_results
    from snnet.sn_net.network import StitchableNetwork

    rows = {r["cfg_id"]: r for r in map(json.loads, (published_dir / name).read_text().splitlines())}
    with torch.device("meta"):  # FLOPs need shapes only
        models = [timm.create_model(a) for a in anchors]
    net = StitchableNetwork(models, names=list(anchors))
    results = published_results(net, rows)
    assert [r.acc1 for r in results] == [rows[i]["acc1"] for i in range(net.num_configs)]
    assert front_figures(results).on_front == on_front
    last = net.num_configs - 1  # the stitch cheapest in the end anchor: its FLOPs differ from stitch 2's
    with pytest.raises(ValueError, match=r"cfg_id 2 \(.*\): published .* not the same configuration"):
        published_results(net, {**rows, 2: rows[last], last: rows[2]})

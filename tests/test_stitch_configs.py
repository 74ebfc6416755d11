"""The generator reproduces the reference SN-Net configuration counts exactly."""
import pytest

from snnet.stitch_configs import AnchorDepths, config_name, generate_stitch_configs, interpolated_pairs, window_pairs

DEIT = AnchorDepths((12,), (0,), True)
SWIN_T, SWIN_SB = AnchorDepths((2, 2, 6, 2), (0, 1, 2), False), AnchorDepths((2, 2, 18, 2), (0, 1, 2), False)
R18, R50 = AnchorDepths((2, 2, 2, 2), (1, 2), False), AnchorDepths((3, 4, 6, 3), (1, 2), False)


@pytest.mark.parametrize(
    "kernel, stride, nearest, expected",
    [(2, 1, True, 71), (1, 1, True, 27), (2, 2, True, 51), (3, 1, True, 111), (2, 1, False, 732)],
)
def test_deit_counts(kernel, stride, nearest, expected):
    configs, _ = generate_stitch_configs([DEIT] * 3, kernel, stride, nearest)
    assert len(configs) == expected
    assert [c.id for c in configs] == list(range(expected))


def test_hierarchical_counts():
    assert len(generate_stitch_configs([SWIN_T, SWIN_SB, SWIN_SB])[0]) == 41
    assert len(generate_stitch_configs([R18, R50])[0]) == 10
    assert len(generate_stitch_configs([R18, SWIN_T])[0]) == 8


def test_deit_default_layers_are_shared_by_windows():
    configs, layers = generate_stitch_configs([DEIT] * 3)
    assert len(layers) == 2 * 11  # 11 windows add pairs, per adjacent anchor pair
    # reference: layer for (j, k) = max(0, max(j, k) - 1)
    for c in configs[3:]:
        (hop,) = c.hops
        assert hop.layer % 11 == max(0, max(hop.front_block, hop.end_block) - 1)
    # every pair of a layer is recorded once, and the layer's pairs are its hops
    for i, spec in enumerate(layers):
        hops = {(h.front_block, h.end_block) for c in configs for h in c.hops if h.layer == i}
        assert hops == set(spec.pairs)


def test_anchors_come_first_then_adjacent_pairs():
    configs, _ = generate_stitch_configs([DEIT] * 3)
    assert [c.anchors for c in configs[:3]] == [(0,), (1,), (2,)]
    assert {c.anchors for c in configs[3:37]} == {(0, 1)} and {c.anchors for c in configs[37:]} == {(1, 2)}


def test_three_anchor_paths_keep_block_order():
    configs, _ = generate_stitch_configs([DEIT] * 3, nearest=False)
    triples = [c for c in configs if len(c.anchors) == 3]
    assert triples and all(c.hops[1].front_block >= c.hops[0].end_block for c in triples)


def test_window_pairs_forward_only_and_interpolation():
    assert [(j, k) for j, k, _ in window_pairs(3, 2, 1, forward_only=True)] == [(0, 1), (1, 2)]
    pairs = interpolated_pairs(2, 4)  # end ids map to front [0, 0, 1, 1]
    assert [(j, k) for j, k, _ in pairs] == [(0, 1), (1, 2), (1, 3)]
    assert [layer for *_, layer in pairs] == [0, 1, 1]  # one layer per front block


def test_bad_kernel_and_incompatible_anchors():
    with pytest.raises(ValueError, match="kernel_size"):
        generate_stitch_configs([DEIT] * 2, kernel_size=0)
    with pytest.raises(ValueError, match="share no stitchable stage"):
        generate_stitch_configs([DEIT, SWIN_T])
    with pytest.raises(ValueError, match="leave no stitch"):
        generate_stitch_configs([AnchorDepths((1,), (0,), False)] * 2)


def test_names_are_readable():
    configs, _ = generate_stitch_configs([DEIT] * 3)
    names = ["deit_tiny", "deit_small", "deit_base"]
    assert config_name(configs[0], names, [12] * 3) == "deit_tiny"
    hop = configs[3].hops[0]
    assert config_name(configs[3], names, [12] * 3) == f"deit_tiny[0:{hop.front_block + 1}] -> deit_small[{hop.end_block}:]"

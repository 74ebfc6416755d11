"""The generator reproduces the reference SN-Net configuration counts exactly."""
import pytest

from snnet.sn_net.stitch_configs import AnchorDepths, config_name, generate_stitch_configs, interpolated_pairs, window_pairs

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


def _two_way(*depths):
    return generate_stitch_configs([AnchorDepths((d,), (0,), True) for d in depths], two_way=True)


@pytest.mark.parametrize(
    "depths, counts",  # anchors, S->L, L->S, L->S->L, S->L->S: the reference's get_stitch_configs_bidirection
    [((12, 24), (2, 12, 11, 55, 55)), ((12, 12), (2, 12, 11, 55, 55)), ((24, 24), (2, 24, 23, 253, 253))],
)
def test_two_way_counts_are_the_reference(depths, counts):
    configs, layers = _two_way(*depths)
    assert len(configs) == sum(counts) and [c.id for c in configs] == list(range(sum(counts)))
    routes = [(0, 1), (1, 0), (1, 0, 1), (0, 1, 0)]  # in the reference's order, after the anchors
    assert [c.anchors for c in configs] == [(0,), (1,)] + [r for r, n in zip(routes, counts[1:]) for _ in range(n)]
    assert len(layers) == counts[1] + counts[2]  # one layer per one-hop stitch, shared by the two-hop routes


def test_two_way_hops_and_layer_sharing_follow_the_reference():
    configs, layers = _two_way(12, 24)
    sl = [c.hops[0] for c in configs[2:14]]
    ls = [c.hops[0] for c in configs[14:25]]
    assert [(h.front_block, h.end_block) for h in sl] == [(i, 2 * (i + 1)) for i in range(12)]
    assert [(h.front_block, h.end_block) for h in ls] == [(i, i // 2 + 1) for i in range(1, 23, 2)]
    one_hop = {(h.front, h.front_block, h.end_block): h.layer for h in sl + ls}
    for c in configs[25:]:
        first, second = c.hops
        assert second.front_block >= first.end_block  # the middle anchor runs at least one block
        assert second.end_block < (24 if second.end == 1 else 12)  # never ends on the head alone
        assert all(h.layer == one_hop[(h.front, h.front_block, h.end_block)] for h in c.hops)
    for i, spec in enumerate(layers):
        assert {(h.front_block, h.end_block) for c in configs for h in c.hops if h.layer == i} == set(spec.pairs)
    names = ["deit3_small", "deit3_large"]
    assert config_name(configs[80], names, [12, 24]) == "deit3_small[0:1] -> deit3_large[2:4] -> deit3_small[2:]"
    assert config_name(configs[25], names, [12, 24]) == "deit3_large[0:2] -> deit3_small[1:2] -> deit3_large[4:]"


def test_two_way_more_anchors_pair_adjacent_ones():
    configs, layers = _two_way(12, 12, 24)
    assert len(configs) == 3 + 133 + 133  # each adjacent pair: its 135 - 2 routes
    assert {c.anchors[0] + c.anchors[1] for c in configs[3:136]} == {1} and {min(c.anchors) for c in configs[136:]} == {1}
    assert len(layers) == 2 * 23


def test_two_way_hierarchical_hops_stay_in_their_stage():
    """ResNet-20 -> ResNet-56 style (3 vs 9 blocks per stage, stitching in stages 0 and 1)."""
    configs, layers = generate_stitch_configs([AnchorDepths((3,) * 3, (0, 1), False), AnchorDepths((9,) * 3, (0, 1), False)], two_way=True)
    sl = [c.hops[0] for c in configs if c.anchors == (0, 1)]
    ls = [c.hops[0] for c in configs if c.anchors == (1, 0)]
    assert [(h.front_block, h.end_block) for h in sl] == [(0, 3), (1, 6), (2, 9), (3, 12), (4, 15), (5, 18)]
    # a stage's last hop enters the next stage's first block, in both directions
    assert [(h.front_block, h.end_block) for h in ls] == [(2, 1), (5, 2), (8, 3), (11, 4), (14, 5), (17, 6)]
    assert [spec.stage for spec in layers] == [0] * 6 + [1] * 6  # stage-major: down then up hops
    assert len(configs) == 2 + 6 + 6 + 15 + 15


def test_two_way_bad_input_names_what_is_supported():
    with pytest.raises(ValueError, match="same number of stages"):
        generate_stitch_configs([DEIT, SWIN_T], two_way=True)
    with pytest.raises(ValueError, match="at most as deep as the other in every stitchable stage"):
        generate_stitch_configs([AnchorDepths((3, 1), (0, 1), False), AnchorDepths((2, 4), (0, 1), False)], two_way=True)
    with pytest.raises(ValueError, match="nearest=True"):
        generate_stitch_configs([DEIT] * 3, nearest=False, two_way=True)
    with pytest.raises(ValueError, match="kernel_size=2, stride=1"):
        generate_stitch_configs([DEIT] * 2, kernel_size=3, two_way=True)

"""The stitchable network on tiny randomly initialised timm models (ViT, Swin, ResNet)."""
import copy

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import assert_forward_many_is_one_at_a_time, assert_path_parameters_are_what_a_step_updates
from snnet.sn_net.network import StitchableNetwork
from snnet.stitching import channels_last


def tiny_vit(dim, depth=4, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=dim, depth=depth, num_heads=2, num_classes=10)


def tiny_swin(dim, depths, seed=0, img_size=32):
    torch.manual_seed(seed)
    return timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=img_size, patch_size=2, window_size=4, embed_dim=dim,
        depths=depths, num_heads=(1, 2, 2, 4), num_classes=10,
    )


def tiny_resnet(name="resnet18", seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=10)


@pytest.fixture(scope="module")
def vit_net():
    return StitchableNetwork([tiny_vit(64, seed=2), tiny_vit(32, seed=0), tiny_vit(48, seed=1)], names=["v64", "v32", "v48"]).eval()


def test_anchors_sorted_fast_to_slow_and_counted(vit_net):
    assert vit_net.anchor_names == ["v32", "v48", "v64"]
    assert vit_net.num_configs == 3 + 2 * (3 * 4 - 2)
    flops = [i.flops for i in vit_net.infos[:3]]
    assert flops == sorted(flops)


def test_anchor_ids_equal_plain_timm_models(vit_net):
    x = torch.randn(3, 3, 32, 32)
    for a in range(3):
        torch.testing.assert_close(vit_net(x, stitch=a), vit_net.anchors[a](x), rtol=0, atol=1e-5)


def test_every_stitch_runs_with_right_shape(vit_net):
    x = torch.randn(2, 3, 32, 32)
    for i in range(vit_net.num_configs):
        assert vit_net(x, stitch=i).shape == (2, 10)


def test_set_stitch_switches_without_rebuilding(vit_net):
    modules = list(vit_net.modules())
    pointers = [p.data_ptr() for p in vit_net.parameters()]
    x = torch.randn(2, 3, 32, 32)
    vit_net.set_stitch(5)
    out = vit_net(x)
    torch.testing.assert_close(out, vit_net(x, stitch=5))
    assert list(vit_net.modules()) == modules and [p.data_ptr() for p in vit_net.parameters()] == pointers
    with pytest.raises(IndexError, match="valid ids are 0..22"):
        vit_net.set_stitch(23)
    vit_net.set_stitch(0)


def test_params_of_anchor_configs_are_the_whole_model(vit_net):
    for a in range(3):
        assert vit_net.infos[a].params == sum(p.numel() for p in vit_net.anchors[a].parameters())


def test_params_of_a_stitch_count_its_path_only(vit_net):
    info = vit_net.infos[3]
    hop = vit_net.configs[3].hops[0]
    front, end = vit_net.anchors[hop.front], vit_net.anchors[hop.end]
    expected = (
        sum(p.numel() for p in front.patch_embed.parameters()) + front.cls_token.numel() + front.pos_embed.numel()
        + sum(p.numel() for b in front.blocks[: hop.front_block + 1] for p in b.parameters())
        + sum(p.numel() for p in vit_net.stitch_layers[hop.layer].parameters())
        + sum(p.numel() for b in end.blocks[hop.end_block:] for p in b.parameters())
        + sum(p.numel() for m in (end.norm, end.head) for p in m.parameters())
    )
    assert info.params == expected


def test_vit_flops_include_attention(vit_net):
    model = vit_net.anchors[0]
    with FlopCounterMode(display=False) as fused:
        model(torch.zeros(1, 3, 32, 32))
    tokens, dim, depth = 17, 32, 4  # 16 patches + class token
    attention = depth * 2 * (2 * tokens * tokens * dim)  # q @ k^T and attn @ v
    assert vit_net.infos[0].flops - fused.get_total_flops() == attention


def _identical_pair(make):
    a = make()
    return [a, copy.deepcopy(a)]


@pytest.mark.parametrize("make", [lambda: tiny_resnet(), lambda: tiny_swin(16, (1, 2, 2, 1))], ids=["resnet", "swin"])
def test_lstsq_between_identical_anchors_recovers_identity(make):
    """Stitching a model to a copy of itself at (j, j+1) must reproduce it exactly after LS init."""
    net = StitchableNetwork(_identical_pair(make), names=["a", "b"], input_size=(3, 32, 32)).eval()
    assert net.num_configs > 2
    x = torch.randn(8, 3, 32, 32)
    net.init_stitches_lstsq([x[:4], x[4:]])
    reference = net(x, stitch=0)
    for i in range(2, net.num_configs):
        torch.testing.assert_close(net(x, stitch=i), reference, rtol=1e-3, atol=1e-3)


def test_cross_family_lstsq_matches_direct_solution():
    """CNN front -> Swin end (NCHW -> NHWC): the fitted layer is the least-squares map on aligned rows."""
    net = StitchableNetwork([tiny_resnet(), tiny_swin(16, (2, 2, 2, 2), img_size=64)], names=["r18", "swin"], input_size=(3, 64, 64)).eval()
    assert {v.layout for v in net.views} == {"nchw", "nhwc"}
    x = torch.randn(6, 3, 64, 64)
    net.init_stitches_lstsq([x])
    spec, layer = net.layer_specs[0], net.stitch_layers[0]
    ((j, k),) = spec.pairs
    front = net.anchor_features(spec.front, x)[j + 1]
    target = channels_last(net.anchor_features(spec.end, x)[k], net.views[spec.end].layout)
    rows = layer.fit_rows(front).double()
    design = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, target.reshape(rows.shape[0], -1).double()).solution
    fitted = channels_last(layer(front), net.views[spec.end].layout)
    torch.testing.assert_close(fitted.reshape(rows.shape[0], -1), (design @ solution).float(), rtol=1e-3, atol=1e-3)
    for i in range(net.num_configs):
        assert net(x, stitch=i).shape == (6, 10)


def test_forward_many_equals_one_stitch_at_a_time(vit_net):
    x = torch.randn(3, 3, 32, 32)
    assert_forward_many_is_one_at_a_time(vit_net, x)
    with pytest.raises(IndexError, match="out of range"):
        vit_net.forward_many(x, [vit_net.num_configs])


def test_path_parameters_are_exactly_those_a_step_updates(vit_net):
    assert_path_parameters_are_what_a_step_updates(vit_net, torch.randn(2, 3, 32, 32))


FIT_ROW_CASES = {  # in_shape, out_shape, in_layout, out_layout, in_prefix_tokens
    "nchw same grid": ((8, 6, 6), (12, 6, 6), "nchw", "nchw", 0),
    "nchw 2x down": ((8, 8, 8), (12, 4, 4), "nchw", "nchw", 0),
    "nchw 3.5x up": ((8, 4, 4), (12, 14, 14), "nchw", "nchw", 0),
    "tokens+cls 14x14 -> nchw 8x8": ((197, 8), (12, 8, 8), "tokens", "nchw", 1),
    "nchw 7x7 -> tokens 12x12": ((8, 7, 7), (144, 12), "nchw", "tokens", 0),
    "tokens same": ((17, 8), (17, 12), "tokens", "tokens", 1),
    "nhwc 8x8 -> nchw 5x5": ((8, 8, 8), (12, 5, 5), "nhwc", "nchw", 0),
    "vector": ((8,), (12,), "vector", "vector", 0),
}


@pytest.mark.parametrize("case", sorted(FIT_ROW_CASES))
def test_fit_rows_at_equals_the_full_rows_at_those_indices(case):
    """CKA in StitchNet aligns only sampled rows: gathering and interpolating at those output
    pixels must give what aligning (bilinear resize, token<->map) every row and indexing gives."""
    from snnet.stitching import StitchingLayer

    in_shape, out_shape, in_layout, out_layout, prefix = FIT_ROW_CASES[case]
    layer = StitchingLayer(in_shape, out_shape, in_layout, out_layout, prefix)
    x = torch.randn(5, *in_shape, generator=torch.Generator().manual_seed(0))
    full = layer.fit_rows(x)
    rows = torch.randperm(full.shape[0], generator=torch.Generator().manual_seed(1))[: full.shape[0] // 3]
    torch.testing.assert_close(layer.fit_rows_at(x, rows), full[rows])  # float32 rounding only (~1e-6)


def test_forward_rows_runs_each_row_through_its_own_stitch(vit_net):
    torch.manual_seed(0)
    x = torch.randn(7, 3, 32, 32)
    stitches = [5, 0, 5, 17, 2, 0, 9]
    with torch.no_grad():
        mixed = vit_net.forward_rows(x, stitches)
        for r, s in enumerate(stitches):
            torch.testing.assert_close(mixed[r:r + 1], vit_net(x[r:r + 1], stitch=s), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(vit_net.forward_rows(x[:3], [4, 4, 4]), vit_net(x[:3], stitch=4))
    with pytest.raises(ValueError, match="got 2 stitch ids for a batch of 7 rows"):
        vit_net.forward_rows(x, [0, 1])
    with pytest.raises(IndexError, match="valid ids are 0..22"):
        vit_net.forward_rows(x[:1], [23])

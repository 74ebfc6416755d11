"""The generic splitter over a representative subset of timm and torchvision families.

Each family: the split equals the unsplit model (check_view), and a self-stitch (block j's output
through a StitchingLayer into block j + 1 of the same anchor) runs forward and backward. Widths
and depths are shrunk with model kwargs where the family allows, to stay within the CI budget;
the full sweep is tools/family_coverage.py.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

from snnet.families import AnchorView, SplitError, anchor_view, check_view, generic_view
from snnet.families import default_input_size
from snnet.stitching import StitchingLayer

# (timm name, kwargs, probe size)
TIMM = [
    ("test_convnext", {}, None),
    ("mobilenetv2_035", {}, (3, 96, 96)),
    ("efficientnet_b0", {}, (3, 96, 96)),
    ("mobilenetv3_small_050", {}, (3, 96, 96)),
    ("regnetx_002", {}, (3, 96, 96)),
    ("levit_128s", {}, None),
    ("eva02_tiny_patch14_224", {"depth": 3, "img_size": 56}, None),
    ("beit_base_patch16_224", {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 64}, None),
    ("densenet121", {"growth_rate": 8, "block_config": (2, 2, 2, 2)}, (3, 64, 64)),
    pytest.param("vgg11", {}, (3, 64, 64), marks=pytest.mark.slow),  # 133M parameters to initialise
    ("test_maxvit", {}, None),
    ("hiera_tiny_224", {}, (3, 224, 224)),
    ("fastvit_t8", {}, (3, 64, 64)),
    ("pvt_v2_b0", {}, (3, 64, 64)),
    ("twins_svt_small", {"depths": (1, 1, 1, 1)}, (3, 64, 64)),
    ("mobilevit_xxs", {}, (3, 64, 64)),
    ("test_byobnet", {}, None),
    ("cspresnet50", {}, (3, 64, 64)),
    ("deit3_small_patch16_224", {"depth": 2, "img_size": 64}, None),
    ("swinv2_tiny_window8_256", {"depths": (1, 1, 1, 1), "img_size": 64, "window_size": 4}, None),
    ("mixer_s16_224", {"img_size": 64}, (3, 64, 64)),
    pytest.param("inception_v3", {}, (3, 96, 96), marks=pytest.mark.slow),
]
TORCHVISION = [("mobilenet_v3_small", (3, 64, 64)), ("resnet18", (3, 64, 64))]


def _self_stitch_backward(view: AnchorView, size: tuple[int, int, int]) -> None:
    """block j -> StitchingLayer -> block j + 1 of the same anchor: a forward and a backward."""
    x = torch.randn(2, *size)
    with torch.no_grad():
        feats = [view.stem(x)]
        for block in view.blocks:
            feats.append(block(feats[-1]))
    j = max(0, len(view.blocks) // 2 - 1)
    layer = StitchingLayer(
        tuple(feats[j + 1].shape[1:]), tuple(feats[j + 1].shape[1:]), view.layout, view.layout,
        view.num_prefix_tokens, view.num_prefix_tokens,
    )
    h = layer(view.blocks[j](feats[j]))
    for block in view.blocks[j + 1:]:
        h = block(h)
    view.head(h).square().mean().backward()
    assert layer.proj.weight.grad is not None and layer.proj.weight.grad.abs().sum() > 0
    grads = [p.grad for b in view.blocks[j + 1:] for p in b.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def _check(model: nn.Module, size: tuple[int, int, int] | None) -> AnchorView:
    with torch.no_grad():  # some families zero-init their classifier, which would stop every gradient
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    model.eval()
    view = anchor_view(model, input_size=size)
    assert check_view(view, size) < 1e-4  # generic views also verify themselves while splitting
    assert len(view.blocks) >= 2 and view.stage_depths and sum(view.stage_depths) == len(view.blocks)
    _self_stitch_backward(view, size or default_input_size(model))
    return view


@pytest.mark.parametrize("name,kwargs,size", TIMM)
def test_timm_family_splits_and_stitches(name, kwargs, size):
    torch.manual_seed(0)
    _check(timm.create_model(name, pretrained=False, **kwargs), size)


@pytest.mark.parametrize("name,size", TORCHVISION, ids=[t[0] for t in TORCHVISION])
def test_torchvision_family_splits_and_stitches(name, size):
    torch.manual_seed(0)
    _check(torchvision.models.get_model(name, weights=None), size)


def test_generic_splitter_matches_the_hand_adapters_blocks():
    """ViT and Swin: the generic split finds the same blocks and stages as the hand adapters."""
    vit = timm.create_model("vit_tiny_patch16_224", depth=3, img_size=32).eval()
    hand, generic = anchor_view(vit), generic_view(vit)
    assert [b is g for b, g in zip(hand.blocks, generic.blocks)] == [True] * 3
    assert (generic.layout, generic.num_prefix_tokens, generic.isotropic) == ("tokens", 1, True)
    swin = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 2, 1), img_size=56, window_size=7).eval()
    assert generic_view(swin).stage_depths == anchor_view(swin).stage_depths == (1, 1, 2, 1)


def test_user_named_blocks_and_clear_errors():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    view = anchor_view(model, blocks=["1", "3"], input_size=(3, 16, 16))
    # block "1" is the module itself; the conv between the named blocks is glue that joins block "3"
    assert view.blocks[0] is model[1] and view.stage_depths == (1, 1)
    assert {id(p) for p in view.blocks[1].parameters()} == {id(p) for p in model[2].parameters()}
    check_view(view, (3, 16, 16))
    with pytest.raises(SplitError, match=r"Sequential.*block 'nope' is not a submodule"):
        generic_view(model, blocks=["nope"], input_size=(3, 16, 16))

    class Twice(nn.Module):  # one block applied twice: it cannot be one position on a path
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(nn.Sequential(nn.Conv2d(3, 3, 1)), nn.Sequential(nn.Conv2d(3, 3, 1)))

        def forward(self, x):
            return self.blocks[1](self.blocks[0](self.blocks[0](x)))

    with pytest.raises(SplitError, match="Twice.*block 'model.blocks.0' is called more than once"):
        generic_view(Twice(), input_size=(3, 8, 8))


# --- SN-Net over the new families ----------------------------------------------------------
def _count(names: list[str], size: tuple[int, int, int] | None, **kwargs) -> int:
    from snnet.sn_net.stitch_configs import AnchorDepths, generate_stitch_configs

    views = [anchor_view(timm.create_model(n, **kwargs).eval(), input_size=size) for n in names]
    depths = [AnchorDepths(v.stage_depths, v.stitch_stages, v.isotropic) for v in views]
    return len(generate_stitch_configs(depths)[0])


def test_levit_192_256_cli_writes_the_reference_8_rows(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "out.json"
    subprocess.run([sys.executable, "-m", "snnet.cli", "stitches", "--anchors", "levit_192", "levit_256",
                    "--pretrained", "false", "--json", str(out)], check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())
    assert len(rows) == 8 and rows[0]["name"] == "levit_192" and "->" in rows[2]["name"]


@pytest.mark.slow
@pytest.mark.parametrize("names,size,kwargs,expected", [
    # stage depths (resolution stages), stitching in all but the last stage, nearest interpolation:
    # (3,3,9,3) -> (3,3,27,3) -> (3,3,27,3): 3 anchors + 2 x (2 + 2 + 26)
    (["convnext_tiny", "convnext_small", "convnext_base"], (3, 64, 64), {}, 63),
    # (1,2,2,6,5) -> (2,3,3,8,7): 2 + 1 + 2 + 2 + 7
    (["efficientnet_b0", "efficientnet_b2"], (3, 64, 64), {}, 14),
    # (1,3,6,6) -> (1,3,8,2): 2 + 0 + 2 + 7
    (["regnety_004", "regnety_008"], (3, 64, 64), {}, 11),
    # isotropic 12 blocks, windows both ways as DeiT: 2 + (3 * 12 - 2)
    (["eva02_tiny_patch14_224", "eva02_small_patch14_224"], None, {"img_size": 56}, 36),
])
def test_snnet_counts_on_new_families(names, size, kwargs, expected):
    assert _count(names, size, **kwargs) == expected


@pytest.mark.slow
def test_mobilenetv3_small_large_have_no_common_stages_and_say_so():
    """MobileNetV3-S reaches stride 4 in its first block, -L at stride 2: 4 vs 5 resolution stages."""
    with pytest.raises(ValueError, match=r"share no stitchable stage \(stages \(1, 2, 5, 4\).*\(1, 2, 3, 6, 4\)"):
        _count(["mobilenetv3_small_100", "mobilenetv3_large_100"], (3, 64, 64))


def test_mixed_families_build_where_stages_line_up():
    from snnet.sn_net.network import StitchableNetwork

    torch.manual_seed(0)
    convnext = timm.create_model("convnext_atto").eval()  # (2, 2, 6, 2), nchw
    swin = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 2, 1), embed_dim=48, num_heads=(2, 2, 2, 2),
                             img_size=64, window_size=4).eval()  # (1, 1, 2, 1), nhwc
    anchor_view(convnext, input_size=(3, 64, 64))
    net = StitchableNetwork([convnext, swin], names=["convnext_atto", "swin"], input_size=(3, 64, 64))
    assert net.num_configs > 2
    x = torch.randn(2, 3, 64, 64)
    net.init_stitches_lstsq([x, x + 1])
    net.eval()  # Swin's drop path is random in train mode
    out = net.forward_many(x, list(range(net.num_configs)))
    for s in range(net.num_configs):
        torch.testing.assert_close(out[s], net(x, stitch=s))
    net(x, stitch=net.num_configs - 1).sum().backward()
    assert any(p.grad is not None for p in net.stitch_layers.parameters())

    effnet = timm.create_model("efficientnet_b0").eval()
    resnet = timm.create_model("resnet18").eval()
    anchor_view(effnet, input_size=(3, 64, 64))
    with pytest.raises(ValueError, match="share no stitchable stage"):  # 5 resolution stages vs ResNet's 4
        StitchableNetwork([effnet, resnet], input_size=(3, 64, 64))


def test_resnet_to_deit_map_to_token_and_mobilenet_to_swin_bottleneck():
    """General stitching across families: ResNet map -> DeiT tokens (linear), and Traft & Cheney's
    MobileNetV3 (early stage) -> Swin-T (late stage) with the bottleneck adapter and bilinear rescale."""
    from snnet.general_stitching.adapters import AdapterConfig
    from snnet.general_stitching.module import build_stitched

    torch.manual_seed(0)
    resnet = timm.create_model("resnet18").eval()
    deit = timm.create_model("deit_tiny_patch16_224", depth=4, img_size=64).eval()
    stitched = build_stitched(resnet, 4, deit, 2, input_size=(3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    stitched(x).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stitched.adapter.parameters())

    mobilenet = torchvision.models.mobilenet_v3_small(weights=None).eval()
    swin = torchvision.models.swin_t(weights=None).eval()
    anchor_view(mobilenet, input_size=(3, 64, 64))
    anchor_view(swin, input_size=(3, 64, 64))
    stitched = build_stitched(mobilenet, 3, swin, len(anchor_view(swin).blocks) - 2,
                              AdapterConfig(name="bottleneck", rescale="bilinear"), input_size=(3, 64, 64))
    stitched(x).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stitched.adapter.parameters())


# --- per-block layouts ---------------------------------------------------------------------
def test_alexnet_classifier_blocks_are_vectors_after_nchw_feature_blocks():
    """Named classifier blocks after the flatten: each block keeps its own layout, and the vector
    blocks form their own stage (so SN-Net never pairs a map with a vector inside one stage)."""
    alexnet = torchvision.models.alexnet(weights=None).eval()
    names = [f"features.{i}" for i in range(13)] + ["classifier.1", "classifier.2", "classifier.4", "classifier.5"]
    view = anchor_view(alexnet, blocks=names, input_size=(3, 64, 64))
    assert view.point_layouts == ["nchw"] * 14 + ["vector"] * 4  # stem output, 13 feature blocks, 4 classifier blocks
    assert view.layout_at(13) == ("nchw", 0) and view.layout_at(14) == ("vector", 0)
    vector_stages = {s for s, lay in zip(view.block_stages, view.point_layouts[1:]) if lay == "vector"}
    map_stages = {s for s, lay in zip(view.block_stages, view.point_layouts[1:]) if lay == "nchw"}
    assert len(vector_stages) == 1 and not vector_stages & map_stages
    assert check_view(view, (3, 64, 64)) < 1e-4


def _plain_net(width: int) -> nn.Sequential:
    """Convs, then a flatten, then linear blocks: nchw points, then vector points."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 2 * width), nn.ReLU(),
        nn.Linear(2 * width, 2 * width), nn.ReLU(), nn.Linear(2 * width, 5),
    ).eval()


def test_snnet_stitches_per_block_layouts_and_ls_init_is_exact_between_copies():
    """Two copies of a conv -> flatten -> linear net, stitched in every stage: each stitching layer
    reads and writes its own blocks' layouts (1x1 conv on maps, linear on vectors), and least
    squares between copies recovers the identity, so every stitch computes the anchor's output."""
    from snnet.sn_net.network import StitchableNetwork

    torch.manual_seed(0)
    a = _plain_net(8)
    b = _plain_net(8)
    b.load_state_dict(a.state_dict())
    blocks = ["1", "3", "7", "9"]  # the ReLUs: two nchw (16x16 grid), two vector
    for m in (a, b):
        view = anchor_view(m, blocks=blocks, input_size=(3, 16, 16))
        assert view.point_layouts[1:] == ["nchw", "nchw", "vector", "vector"] and view.stage_depths == (2, 2)
    net = StitchableNetwork([a, b], names=["a", "b"], input_size=(3, 16, 16), stitch_stages=(0, 1))
    layouts = {(layer.in_layout, layer.out_layout) for layer in net.stitch_layers}
    assert layouts == {("nchw", "nchw"), ("vector", "vector")}
    x = torch.randn(64, 3, 16, 16)
    net.init_stitches_lstsq([x])
    with torch.no_grad():
        ref = a(x)
        for s in range(net.num_configs):
            torch.testing.assert_close(net(x, stitch=s), ref, atol=1e-3, rtol=1e-3)


def test_copy_with_view_keeps_the_split_and_reads_the_copys_buffers():
    """export's trimmed copies cannot be split again (unused tensors are None): the copy takes the
    view along, and a piece reading a buffer through fx (get_attr) reads the copy's, not the original's."""
    from snnet.families import copy_with_view

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("offset", torch.zeros(4, 1, 1))
            self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(2)])
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x = self.blocks(x[:, :4] + self.offset)
            return self.fc(x.mean((2, 3)))

    model = Net().eval()
    view = anchor_view(model, input_size=(4, 8, 8))
    copied = copy_with_view(model)
    copied.offset.fill_(1.0)
    copied_view = anchor_view(copied)
    assert [b is c for b, c in zip(copied_view.blocks, copied.blocks)] == [True, True]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(copied_view.stem(x), x + 1.0)
        torch.testing.assert_close(view.stem(x), x)
        torch.testing.assert_close(copied_view.head(copied_view.blocks[1](copied_view.blocks[0](copied_view.stem(x)))), copied(x))

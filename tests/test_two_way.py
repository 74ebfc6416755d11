"""SN-Netv2's space on real networks: the published DeiT3-S/L FLOPs identify every route, the new
routes run, share prefixes, initialise by least squares, train, evaluate and export like v1 stitches,
and LoRA stitching layers merge into the plain affine map."""
import copy
import json
import os
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import yaml

from helpers import assert_forward_many_is_one_at_a_time, assert_path_parameters_are_what_a_step_updates
from snnet.sn_net.build import NetworkConfig, build_network
from snnet.cli import main
from snnet.data import DigitsDataModule
from snnet.deploy.export import export_stitch, extract_stitch, load_stitch
from snnet.sn_net.module import DistillConfig, OptimConfig, SNNetModule, StitchInitConfig
from snnet.sn_net.network import StitchableNetwork
from snnet.optim import decay_groups
from snnet.results import select_stitch
from snnet.stitching import StitchingLayer

# beside the data (../shared/data -> ../shared/reference), as .ci/run lays them out
SHARED = Path(os.environ["SNNET_DATA_DIR"]).parent if os.environ.get("SNNET_DATA_DIR") else Path(__file__).parents[2] / "shared"
PUBLISHED = SHARED / "reference" / "published-results" / "snnetv2_deit3_s_l.jsonl"

TINY = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "num_heads": 2, "num_classes": 10}
DEIT3 = ["deit3_small_patch16_224", "deit3_large_patch16_224"]
# timm names (export rebuilds anchors by name); the kwargs go to both, so depths (4, 4): 15 configurations
TINY_CONFIG = NetworkConfig(anchors=DEIT3, pretrained=False, model_kwargs={**TINY, "depth": 4}, two_way=True)


def tiny_deit3(depth, dim, seed):
    torch.manual_seed(seed)
    return timm.create_model("deit3_small_patch16_224", **{**TINY, "embed_dim": dim}, depth=depth)


@pytest.fixture(scope="module")
def net():
    """Depths 4 and 8 (the DeiT3-S/L ratio), widths 32 and 48: both directions change width.
    2 anchors + 4 S->L + 3 L->S + 3 L->S->L + 3 S->L->S."""
    net = StitchableNetwork([tiny_deit3(8, 48, 1), tiny_deit3(4, 32, 0)], names=["l", "s"], two_way=True).eval()
    with torch.no_grad():
        for p in net.stitch_layers.parameters():
            p.normal_(0, 0.1)
    return net


@pytest.mark.skipif(not PUBLISHED.is_file(), reason=f"published SN-Netv2 results not found at {PUBLISHED} (set SNNET_DATA_DIR to ../shared/data)")
def test_published_deit3_flops_identify_every_route():
    """Real DeiT3-S/L shapes (built on the meta device: FLOPs need shapes only): 135 configurations,
    and every published cfg_id's fvcore multiply-adds match ours within a sixth of the cheapest block,
    so each id is the reference's route (neighbouring routes differ by at least one block)."""
    with torch.device("meta"):
        anchors = [timm.create_model(n) for n in ("deit3_small_patch16_224", "deit3_large_patch16_224")]
        net = StitchableNetwork(anchors, names=["deit3_small", "deit3_large"], two_way=True)
    assert net.num_configs == 135
    tolerance = min(net.profiles[0].block_flops) / 2 / 6
    rows = [json.loads(line) for line in PUBLISHED.read_text().splitlines()]
    assert len(rows) == 134 and 13 not in {r["cfg_id"] for r in rows}  # the reference skips S[0:12] -> L[24:]
    for r in rows:
        assert abs(net.infos[r["cfg_id"]].flops / 2 - r["flops"]) < tolerance, (r["cfg_id"], net.infos[r["cfg_id"]].name)
    names = {i.name for i in net.infos}
    assert "deit3_small[0:4] -> deit3_large[8:20] -> deit3_small[10:]" in names
    assert net.infos[13].name == "deit3_small[0:12] -> deit3_large[24:]"


def test_every_route_runs_and_forward_many_is_bit_identical(net):
    assert net.num_configs == 15
    assert net.infos[12].name == "s[0:1] -> l[2:4] -> s[2:]"
    assert_forward_many_is_one_at_a_time(net, torch.randn(3, 3, 16, 16))
    # l[0:2] -> s[1:2] -> l[4:] and l[0:2] -> s[1:3] -> l[6:] share l's stem, l blocks 0-1, the
    # L->S layer and s block 1: computed once
    assert net.infos[9].name == "l[0:2] -> s[1:2] -> l[4:]" and net.infos[10].name == "l[0:2] -> s[1:3] -> l[6:]"
    l_prof, s_prof = net.profiles[net.anchor_names.index("l")], net.profiles[net.anchor_names.index("s")]
    shared = l_prof.stem_flops + sum(l_prof.block_flops[:2]) + net._layer_flops(net.configs[9].hops[0].layer) + s_prof.block_flops[1]
    assert net.forward_many_flops([9, 10]) == net.infos[9].flops + net.infos[10].flops - shared


def test_path_parameters_of_two_hop_routes_are_what_a_step_updates(net):
    assert_path_parameters_are_what_a_step_updates(net, torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("name, configs", [("deit3", 15), ("cifar_resnet14", 2 + 4 + 4 + 6 + 6)])
def test_lstsq_between_identical_anchors_makes_every_route_the_anchor(name, configs):
    """A model stitched to a copy of itself: every hop (both directions, and for the ResNet across
    a stage's end into the next stage) maps block j's output to block j + 1's input, which least
    squares recovers as the identity, so every route equals the anchor."""
    torch.manual_seed(0)
    a = tiny_deit3(4, 32, 0) if name == "deit3" else timm.create_model(name, num_classes=10)
    net = StitchableNetwork([a, copy.deepcopy(a)], names=["a", "b"], two_way=True, input_size=(3, 16, 16)).eval()
    assert net.num_configs == configs
    x = torch.randn(16, 3, 16, 16)
    net.init_stitches_lstsq([x[:8], x[8:]])
    reference = net(x, stitch=0)
    with torch.no_grad():
        outs = net.forward_many(x, range(net.num_configs))
    for i, out in outs.items():
        torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-3, msg=lambda m: f"stitch {i} {net.infos[i].name}: {m}")


def test_export_of_two_hop_routes_equals_the_network(tmp_path):
    torch.manual_seed(0)
    net = build_network(TINY_CONFIG).eval()
    with torch.no_grad():
        for p in net.stitch_layers.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(2, 3, 16, 16)
    two_hop = [c.id for c in net.configs if len(c.hops) == 2]
    assert len(two_hop) == 6
    for stitch in two_hop:
        module = extract_stitch(net, stitch).eval()
        assert sum(p.numel() for p in module.parameters()) == net.infos[stitch].params
        torch.testing.assert_close(module(x), net(x, stitch), rtol=0, atol=0)
    out = export_stitch(net, two_hop[-1], tmp_path / "export", TINY_CONFIG.model_kwargs)
    torch.testing.assert_close(load_stitch(out)(x), net(x, two_hop[-1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shapes",
    [((17, 32), (17, 48), "tokens", "tokens", 1), ((8, 6, 6), (12, 6, 6), "nchw", "nchw", 0), ((8, 8, 8), (12, 4, 4), "nchw", "nhwc", 0)],
    ids=["tokens", "nchw", "nchw->nhwc"],
)
def test_lora_layer_merged_equals_unmerged(shapes):
    in_shape, out_shape, in_layout, out_layout, prefix = shapes
    torch.manual_seed(0)
    layer = StitchingLayer(in_shape, out_shape, in_layout, out_layout, prefix, prefix, lora_rank=4)
    assert torch.count_nonzero(layer.lora_b) == 0 and not layer.proj.weight.requires_grad
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.5)  # as after training
    x = torch.randn(3, *in_shape)
    unmerged = layer.train()(x)
    merged_eval = layer.eval()(x)
    plain = layer.merged()
    assert not plain.lora_rank and sum(p.numel() for p in plain.parameters()) == layer.in_features * layer.out_features + layer.out_features
    torch.testing.assert_close(merged_eval, unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain(x), unmerged, rtol=0, atol=1e-5)
    assert (unmerged - layer.proj(x) if in_layout == out_layout == "nchw" else unmerged).abs().sum() > 0
    layer.set_affine(torch.eye(layer.out_features, layer.in_features), torch.zeros(layer.out_features))  # loading a map resets the update: the layer is that map
    assert torch.count_nonzero(layer.lora_b) == 0


def test_lora_network_trains_only_its_update_and_exports_as_plain(tmp_path):
    """Only stitching-layer parameters trained (anchors frozen): the least-squares weight stays,
    the update and bias move; infos and the export count a plain stitch's parameters."""
    torch.manual_seed(0)
    lora = build_network(NetworkConfig(**{**TINY_CONFIG.__dict__, "stitch_lora_rank": 4}))
    torch.manual_seed(0)
    plain = build_network(TINY_CONFIG)
    assert [i.params for i in lora.infos] == [i.params for i in plain.infos]
    assert [i.flops for i in lora.infos] == [i.flops for i in plain.infos]
    x = torch.randn(8, 3, 16, 16)
    lora.init_stitches_lstsq([x])
    lora.anchors.requires_grad_(False)
    frozen = [layer.proj.weight.clone() for layer in lora.stitch_layers]
    opt = torch.optim.AdamW(decay_groups(lora.stitch_layers.parameters(), 0.05), lr=1e-2)
    lora.train()
    for stitch in (12, 9, 12):  # S->L->S, L->S->L
        opt.zero_grad()
        lora(x, stitch).square().mean().backward()
        opt.step()
    for layer, weight in zip(lora.stitch_layers, frozen):
        assert torch.equal(layer.proj.weight, weight)
    used = lora.stitch_layers[lora.configs[12].hops[0].layer]
    assert torch.count_nonzero(used.lora_b) > 0
    lora.eval()
    module = extract_stitch(lora, 12).eval()
    assert sum(p.numel() for p in module.parameters()) == lora.infos[12].params == plain.infos[12].params
    with torch.no_grad():
        torch.testing.assert_close(module(x), lora(x, 12), rtol=0, atol=1e-5)
        torch.testing.assert_close(lora.eval()(x, 12), lora.train()(x, 12), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_way_lora_module_trains_and_scores_every_route(tmp_path):
    L.seed_everything(0)
    module = SNNetModule(
        network=NetworkConfig(**{**TINY_CONFIG.__dict__, "stitch_lora_rank": 4}),
        optim=OptimConfig(lr=1e-3, warmup_steps=1), distill=DistillConfig(teacher=None),
        stitch_init=StitchInitConfig(images=16, batch_size=16), seed=0,
    )
    data = DigitsDataModule(data_config=module.data_config, batch_size=16, train_limit=48, val_limit=16, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.validate(module, data)
    assert [r.id for r in module.results] == list(range(15))
    two_hop = [r for r in module.results if len(module.net.configs[r.id].hops) == 2]
    budget = min(r.flops for r in two_hop) / 1e9  # a budget that admits the cheapest two-hop route
    best = select_stitch(module.results, max_gflops=budget)
    assert best.acc1 == max(r.acc1 for r in module.results if r.gflops <= budget)


@pytest.mark.slow
def test_cli_lists_the_two_way_space(tmp_path, capsys):
    config = tmp_path / "net.yaml"
    config.write_text(yaml.safe_dump({"network": {"anchors": DEIT3, "model_kwargs": TINY}}))  # depths 12, 24
    out = tmp_path / "out.json"
    main(["stitches", "--config", str(config), "--pretrained", "false", "--two-way", "true", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert len(rows) == 135 and [r["id"] for r in rows] == list(range(135))
    assert rows[80]["name"] == "deit3_small_patch16_224[0:1] -> deit3_large_patch16_224[2:4] -> deit3_small_patch16_224[2:]"
    assert "deit3_small_patch16_224[0:4] -> deit3_large_patch16_224[8:20] -> deit3_small_patch16_224[10:]" in {r["name"] for r in rows}
    main(["stitches", "--config", str(config), "--pretrained", "false", "--json", str(out)])
    assert len(json.loads(out.read_text())) == 2 + 23  # default: SN-Net v1's space, unchanged
    with pytest.raises(SystemExit):
        main(["stitches", "--anchors", "cifar_resnet8", "cifar_resnet14", "--pretrained", "false", "--two-way", "true", "--nearest", "false"])
    assert "nearest=True" in capsys.readouterr().err

"""Exporting one stitch as a standalone model: same outputs, only its own weights, rebuilt from disk
without the other anchors, a torch.export program, and the `snnet export` round trip from a checkpoint."""
import json

import lightning as L
import pytest
import torch
from safetensors import safe_open

from helpers import perturbed_network, tiny_data, tiny_module
from snnet.sn_net.build import NetworkConfig
from snnet.cli import main
from snnet.deploy.evaluate import evaluate_stitches
from snnet.deploy.export import export_stitch, extract_stitch, load_program, load_recipe, load_stitch
from snnet.results import save_results, select_stitch

CIFAR = NetworkConfig(anchors=["cifar_resnet8", "cifar_resnet14", "cifar_resnet20"], pretrained=False, input_size=(3, 16, 16))
VIT = NetworkConfig(anchors=["deit_tiny_patch16_224", "deit_small_patch16_224"], pretrained=False,
                    model_kwargs={"img_size": 32, "depth": 3, "num_classes": 10})


@pytest.fixture(scope="module")
def cifar_net():
    return perturbed_network(CIFAR)


@pytest.fixture(scope="module")
def vit_net():
    return perturbed_network(VIT)


def weight_names(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_standalone_equals_the_network_at_every_id_with_exactly_its_parameters(cifar_net):
    x = torch.randn(4, 3, 16, 16)
    assert any(not i.is_anchor for i in cifar_net.infos) and any(i.is_anchor for i in cifar_net.infos)
    for info in cifar_net.infos:
        module = extract_stitch(cifar_net, info.id).eval()
        with torch.no_grad():
            assert (module(x) - cifar_net(x, info.id)).abs().max() < 1e-5, info.name
        assert sum(p.numel() for p in module.parameters()) == info.params
        path = {id(p) for p in cifar_net.path_parameters(info.id)}
        assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in cifar_net.parameters() if id(p) in path)


def test_export_holds_only_the_path_and_rebuilds_from_disk(cifar_net, tmp_path):
    stitch = next(i for i in cifar_net.infos if not i.is_anchor and cifar_net.configs[i.id].anchors == (0, 1))
    export_stitch(cifar_net, stitch.id, tmp_path)
    recipe = load_recipe(tmp_path)
    assert [p.model for p in recipe.anchors] == ["cifar_resnet8", "cifar_resnet14"]  # cifar_resnet20 not needed
    names = weight_names(tmp_path / "model.safetensors")
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in names} == {"anchors.0", "anchors.1", "stitch_layers.0"}
    hop = cifar_net.configs[stitch.id].hops[0]
    assert "anchors.1.conv1.weight" not in names and "anchors.0.linear.weight" not in names  # end's stem, front's head
    assert "anchors.0.conv1.weight" in names and "anchors.1.linear.weight" in names
    assert hop.front_block + 1 < 3 and "anchors.0.layer3.0.conv1.weight" not in names  # front blocks after the hop
    assert (hop.end_block > 0) == ("anchors.1.layer1.0.conv1.weight" not in names)  # end blocks before the hop

    x = torch.randn(5, 3, 16, 16)  # another batch size than the traced one: the batch dimension is dynamic
    with torch.no_grad():
        reference = cifar_net(x, stitch.id)
        loaded = load_stitch(tmp_path)
        assert (loaded(x) - reference).abs().max() < 1e-5
        assert (load_program(tmp_path).module()(x) - reference).abs().max() < 1e-5
    assert sum(p.numel() for p in loaded.parameters()) == stitch.params == recipe.params
    assert json.loads((tmp_path / "stitch.json").read_text())["name"] == stitch.name


def test_vit_stitch_stem_and_head_span_several_modules(vit_net, tmp_path):
    """A ViT stem reads patch_embed, cls_token and pos_embed; its head norm, fc_norm and head."""
    x = torch.randn(3, 3, 32, 32)
    stitch = vit_net.num_configs - 1
    assert not vit_net.infos[stitch].is_anchor
    export_stitch(vit_net, stitch, tmp_path, VIT.model_kwargs)
    loaded, program = load_stitch(tmp_path), load_program(tmp_path).module()
    with torch.no_grad():
        reference = vit_net(x, stitch)
        assert (loaded(x) - reference).abs().max() < 1e-5
        assert (program(x) - reference).abs().max() < 1e-5
    assert sum(p.numel() for p in loaded.parameters()) == vit_net.infos[stitch].params
    names = weight_names(tmp_path / "model.safetensors")
    assert {"anchors.0.cls_token", "anchors.0.pos_embed", "anchors.1.head.weight", "anchors.1.norm.weight"} <= names
    assert not {"anchors.1.cls_token", "anchors.1.pos_embed", "anchors.0.head.weight", "anchors.0.norm.weight"} & names


def test_wrong_model_kwargs_are_a_clear_error_at_load(tmp_path):
    """A network built from models directly has no specs: export needs their timm kwargs."""
    import timm

    from snnet.sn_net.network import StitchableNetwork

    anchors = [timm.create_model(n, **VIT.model_kwargs) for n in VIT.anchors]
    export_stitch(StitchableNetwork(anchors, names=VIT.anchors), 0, tmp_path)  # kwargs forgotten: a 224 px ViT
    with pytest.raises(ValueError, match="were the anchors built with other timm kwargs"):
        load_stitch(tmp_path)


# torchvision anchors with their own kwargs; ResNet-18 cut at its stages by named blocks, ResNet-34 by the splitter
TORCHVISION = NetworkConfig(
    anchors=[{"name": "resnet18", "source": "torchvision", "kwargs": {"num_classes": 7},
              "blocks": ["layer1", "layer2", "layer3", "layer4"]},
             {"name": "resnet34", "source": "torchvision", "kwargs": {"num_classes": 7}}],
    pretrained=False, input_size=(3, 32, 32))


def test_export_of_per_anchor_spec_anchors_rebuilds_them_and_old_recipes_still_load(cifar_net, tmp_path):
    net = perturbed_network(TORCHVISION)
    assert [len(v.blocks) for v in net.views] == [4, 16]
    stitch = next(i for i in net.infos if not i.is_anchor)
    export_stitch(net, stitch.id, tmp_path / "tv")  # no model_kwargs: the specs carry each anchor's own
    recipe = load_recipe(tmp_path / "tv")
    assert [p.spec for p in recipe.anchors] == [
        {"name": "resnet18", "source": "torchvision", "kwargs": {"num_classes": 7}, "blocks": ["layer1", "layer2", "layer3", "layer4"]},
        {"name": "resnet34", "source": "torchvision", "kwargs": {"num_classes": 7}, "blocks": None},
    ]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        loaded = load_stitch(tmp_path / "tv")
        torch.testing.assert_close(loaded(x), net(x, stitch.id), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_program(tmp_path / "tv").module()(x), net(x, stitch.id), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) == stitch.params

    # a recipe written before specs (timm names and one model_kwargs) still loads
    export_stitch(cifar_net, cifar_net.num_configs - 1, tmp_path / "old")
    path = tmp_path / "old" / "stitch.json"
    old = json.loads(path.read_text())
    for part in old["anchors"]:
        del part["spec"]
    path.write_text(json.dumps(old))
    y = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_stitch(tmp_path / "old")(y), cifar_net(y, cifar_net.num_configs - 1), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real `snnet fit` checkpoint (least-squares init plus one training step) and its module."""
    root = tmp_path_factory.mktemp("fit")
    module = tiny_module(teacher=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_checkpointing=False, default_root_dir=root)
    data = tiny_data(module)
    trainer.fit(module, data)
    trainer.save_checkpoint(root / "last.ckpt")
    results = evaluate_stitches(module.net, data.val_dataloader(), progress=False).results
    save_results(results, root / "val_results.json")
    return root, module.net.eval(), results


def test_cli_exports_an_id_or_a_budget_from_a_checkpoint(checkpoint, tmp_path, capsys):
    root, net, results = checkpoint
    x = torch.randn(4, 3, 16, 16)
    main(["export", "--ckpt", str(root / "last.ckpt"), "--stitch", "2", "--out", str(tmp_path / "id")])
    with torch.no_grad():
        assert (load_stitch(tmp_path / "id")(x) - net(x, 2)).abs().max() < 1e-5
    budget = sorted(r.gflops for r in results)[1]
    main(["export", "--ckpt", str(root / "last.ckpt"), "--max-gflops", str(budget), "--results",
          str(root / "val_results.json"), "--out", str(tmp_path / "budget")])
    chosen = select_stitch(results, max_gflops=budget)
    assert load_recipe(tmp_path / "budget").id == chosen.id
    assert f"exported stitch {chosen.id} ({chosen.name}" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--max-gflops", "1e-9"], "cheapest stitch"),
    (["--max-gflops", "1"], "a budget needs measured accuracies"),
    (["--stitch", "99"], "stitch id 99 out of range: valid ids are 0..3"),
    (["--stitch", "1", "--max-gflops", "1"], "not both"),
    ([], "give --stitch ID, or a budget"),
])
def test_cli_bad_input_is_a_clear_error(checkpoint, tmp_path, capsys, args, message):
    root, _, _ = checkpoint
    results = ["--results", str(root / "val_results.json")] if "1e-9" in args else []
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(root / "last.ckpt"), *args, *results, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err

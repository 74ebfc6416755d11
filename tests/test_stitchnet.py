"""StitchNet: fragment pool, activation cache, closed-form heads, composition (Algorithm 1),
bridges and their fusion, bad input, and the zero-epoch LightningModule."""
from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

import snnet.models  # noqa: F401  (registers cifar_resnet*)
from snnet.data import DigitsDataModule
from snnet.families import anchor_view
from snnet.profiling import num_params, profile_anchor
from snnet.stitchnet.bridges import make_bridge
from snnet.stitchnet.composition import compose, evaluate
from snnet.stitchnet.fragments import build_fragment_pool, pool_activations
from snnet.stitchnet.heads import class_means_head, ridge_head
from snnet.stitchnet.module import PoolConfig, StitchNetModule
from snnet.stitchnet.search import ComposeConfig, NoCompositionError

SIZE = (3, 16, 16)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: timm.create_model(name).eval() for name in ("cifar_resnet8", "cifar_resnet14")}


@pytest.fixture(scope="module")
def block_pool(resnets):
    return build_fragment_pool(resnets, "block", SIZE)


# ------------------------------------------------------------------------------ plain nets
def plain_net(seed: int = 0) -> nn.Sequential:
    """Conv/BN/Tanh layers (Tanh keeps every channel alive, so bridges are full rank), a nested
    Sequential, pooling to a vector, two linear layers."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(),
        nn.Conv2d(6, 8, 3, padding=1), nn.Tanh(),
        nn.Sequential(nn.Conv2d(8, 10, 3, padding=1, stride=2), nn.Tanh()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(10, 12), nn.Tanh(),
        nn.Linear(12, 5),
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
    return net.eval()


@torch.no_grad()
def permuted_copy(net: nn.Sequential, seed: int) -> nn.Sequential:
    """The same function with every hidden channel permuted: its activations are permutations of
    ``net``'s, so CKA between matching layers is exactly 1 and least squares recovers the map."""
    import copy

    out = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(seed)
    conv0, bn, conv1, conv2, fc1, fc2 = out[0], out[1], out[3], out[5][0], out[8], out[10]
    for producer, consumer, norm in ((conv0, conv1, bn), (conv1, conv2, None), (conv2, fc1, None), (fc1, fc2, None)):
        perm = torch.randperm(producer.weight.shape[0], generator=gen)
        producer.weight.copy_(producer.weight[perm])
        producer.bias.copy_(producer.bias[perm])
        if norm is not None:
            for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
                t.copy_(t[perm])
        consumer.weight.copy_(consumer.weight[:, perm])
    return out


# ------------------------------------------------------------------------------ the pool
def test_block_fragments_chain_back_into_each_model(resnets, block_pool) -> None:
    x = _randn(4, *SIZE, seed=1)
    assert len(block_pool) == 3 + 6
    for name, model in resnets.items():
        frags = [f for f in block_pool.fragments if f.source == name]
        assert [f.position for f in frags] == list(range(len(frags)))
        assert [f.takes_input for f in frags] == [True] + [False] * (len(frags) - 1)
        assert [f.produces_output for f in frags] == [False] * (len(frags) - 1) + [True]
        h = x
        for f in frags:
            assert tuple(h.shape[1:]) == f.in_shape
            h = f.module(h)
            assert tuple(h.shape[1:]) == f.out_shape
        assert torch.equal(h, model(x))
        assert sum(f.params for f in frags) == num_params([model])
        assert sum(f.flops for f in frags) == profile_anchor(anchor_view(model), SIZE).flops
        assert torch.equal(frags[-1].module.features(_pre_head(model, x)),
                           model.forward_head(model.forward_features(x), pre_logits=True))
    assert block_pool.anchor_params == {n: num_params([m]) for n, m in resnets.items()}


def _pre_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block's input (what the output fragment receives)."""
    h = torch.relu(model.bn1(model.conv1(x)))
    blocks = [*model.layer1, *model.layer2, *model.layer3]
    for block in blocks[:-1]:
        h = block(h)
    return h


def test_layer_granularity_cuts_plain_nets_and_refuses_residual_ones(resnets) -> None:
    net = plain_net()
    pool = build_fragment_pool({"plain": net}, "layer", (3, 8, 8))
    frags = pool.fragments
    assert len(frags) == 5  # one per Conv2d / Linear, the nested Sequential flattened
    assert [f.in_layout for f in frags] == ["nchw", "nchw", "nchw", "vector", "vector"]
    assert [f.out_shape for f in frags] == [(6, 8, 8), (8, 8, 8), (10,), (12,), (5,)]
    assert [type(f.first_op).__name__ for f in frags] == ["NoneType", "Conv2d", "Conv2d", "Linear", "NoneType"]
    x = _randn(3, 3, 8, 8, seed=2)
    h = x
    for f in frags:
        h = f.module(h)
    assert torch.equal(h, net(x))
    assert sum(f.params for f in frags) == num_params([net])
    with pytest.raises(ValueError, match="residual blocks.*granularity='block'"):
        build_fragment_pool({"r8": resnets["cifar_resnet8"]}, "layer", SIZE)
    with pytest.raises(ValueError, match=r"unknown granularity 'conv'.*\('block', 'layer'\)"):
        build_fragment_pool({"plain": net}, "conv", (3, 8, 8))


def test_activations_are_cached_and_reloaded_without_any_forward(tmp_path, resnets, block_pool) -> None:
    calls = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1))
               for model in resnets.values() for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        x = _randn(6, *SIZE, seed=3)
        first = pool_activations(block_pool, x, root=tmp_path, progress=False)
        ran = len(calls)
        assert ran > 0 and not first.from_cache
        second = pool_activations(block_pool, x, root=tmp_path, progress=False)
        assert len(calls) == ran and second.from_cache
        for a, b in zip(first.outputs + list(first.features.values()), second.outputs + list(second.features.values())):
            assert torch.equal(a, b)
        assert all(torch.equal(a, b) for a, b in zip(first.inputs, second.inputs))
        pool_activations(block_pool, x + 1e-3, root=tmp_path, progress=False)  # other samples: a miss
        assert len(calls) == 2 * ran
        assert len(list((tmp_path / "stitchnet").glob("*.pt"))) == 2
    finally:
        for h in handles:
            h.remove()


def test_pool_digest_follows_the_weights(resnets) -> None:
    a = build_fragment_pool(resnets, "block", SIZE)
    torch.manual_seed(1)
    other = {name: timm.create_model(name) for name in resnets}  # same names, other weights
    assert build_fragment_pool(other, "block", SIZE).digest != a.digest
    assert build_fragment_pool(resnets, "block", SIZE).digest == a.digest


# ------------------------------------------------------------------------------ heads
def test_ridge_head_matches_sklearn_and_recovers_an_exact_linear_map() -> None:
    from sklearn.linear_model import Ridge

    k, d, n = 4, 9, 80
    y = torch.arange(n) % k
    feats = _randn(n, d, seed=10).double() + 3.0
    head = ridge_head(feats, y, k, ridge=0.3)
    lam = 0.3 * float((feats - feats.mean(0)).square().sum()) / d
    ref = Ridge(alpha=lam, fit_intercept=True).fit(feats.numpy(), np.eye(k)[y.numpy()])
    assert np.allclose(head.weight.detach().numpy(), ref.coef_, atol=1e-10)
    assert np.allclose(head.bias.detach().numpy(), ref.intercept_, atol=1e-10)
    # features that are a linear image of the one-hot labels: ridge 0 must give back the labels exactly
    mix = _randn(k, d, seed=11).double()
    with pytest.warns(UserWarning, match="rank-deficient"):  # features span k-1 directions: min-norm solution
        exact = ridge_head(torch.eye(k).double()[y] @ mix + 5.0, y, k, ridge=0.0)
    fresh = torch.arange(12) % k
    assert torch.allclose(exact(torch.eye(k).double()[fresh] @ mix + 5.0), torch.eye(k).double()[fresh], atol=1e-9)


def test_leave_one_out_ridge_matches_refitting_without_each_sample() -> None:
    from snnet.stitchnet.heads import RIDGE_GRID, loo_errors

    n, d, k = 14, 20, 3  # fewer samples than features, as with 32 images and 64 channels
    y = torch.arange(n) % k
    feats = _randn(n, d, seed=12).double() + torch.eye(k, d).double()[y] * 2.0
    targets = torch.eye(k).double()[y]
    fc, tc = feats - feats.mean(0), targets - targets.mean(0)
    got = loo_errors(fc, tc)
    for r, err in zip(RIDGE_GRID, got.tolist()):
        brute = 0.0
        for i in range(n):
            keep = torch.arange(n) != i
            head = ridge_head(feats[keep], y[keep], k, ridge=r * _rel(fc) / _rel(feats[keep] - feats[keep].mean(0)))
            brute += float((head(feats[i:i + 1])[0] - targets[i]).square().sum())
        assert err == pytest.approx(brute, rel=1e-8)
    chosen = ridge_head(feats, y, k)  # ridge=None: the grid's leave-one-out minimum
    best = RIDGE_GRID[int(got.argmin())]
    assert torch.allclose(chosen.weight, ridge_head(feats, y, k, ridge=best).weight, atol=1e-12)
    assert got.min() < got.max() / 2  # the choice matters on this data


def _rel(fc: torch.Tensor) -> float:
    return float(fc.square().sum()) / fc.shape[1]


def test_class_means_head_is_nearest_mean_and_separates_blobs() -> None:
    centres = _randn(3, 5, seed=20) * 6
    y = torch.arange(30) % 3
    feats = centres[y] + 0.5 * _randn(30, 5, seed=21)
    head = class_means_head(feats, y, 3)
    means = torch.stack([feats[y == c].mean(0) for c in range(3)])
    assert torch.allclose(head.weight, 2 * means, atol=1e-5)
    y_test = torch.arange(300) % 3
    test = centres[y_test] + 0.5 * _randn(300, 5, seed=22)
    nearest = torch.cdist(test, means).argmin(1)
    assert torch.equal(head(test).argmax(1), nearest)
    assert torch.equal(nearest, y_test)
    with pytest.raises(ValueError, match=r"classes \[2\] have no sample"):
        class_means_head(feats[y < 2], y[y < 2], 3)


# ------------------------------------------------------------------------------ composition
@pytest.fixture(scope="module")
def twin_pool():
    net = plain_net()
    return net, build_fragment_pool({"a": net, "b": permuted_copy(net, seed=5)}, "layer", (3, 8, 8))


def test_compose_finds_the_permuted_twin_with_cka_one_and_exact_outputs(twin_pool) -> None:
    net, pool = twin_pool
    x = _randn(64, 3, 8, 8, seed=30)
    comp = compose(pool, x, config=ComposeConfig(max_networks=8), cache=False, progress=False)
    top = comp.candidates
    assert len(top) == 8
    assert all(abs(c.score - 1.0) < 1e-6 for c in top)
    mixed = [c for c in top if {f.split("[")[0] for f in c.fragments} == {"a", "b"}]
    assert mixed and all(c.bridges for c in mixed)
    fresh = _randn(16, 3, 8, 8, seed=31)
    expected = net(fresh)
    outputs = comp.forward_many(fresh)
    for c in top:
        assert torch.allclose(outputs[c.id], expected, atol=1e-4), c.name
        assert torch.allclose(comp(fresh, c.id), outputs[c.id], atol=1e-6)
    assert comp.stats.incompatible_pairs > 0  # vector outputs never bridge to conv inputs


def test_fused_bridges_give_the_unfused_outputs() -> None:
    """Two unrelated nets, so bridges carry real biases: folding them into a padded, strided conv
    needs the position-dependent bias map (a constant bias would be wrong at the borders). float64
    throughout: least-squares bridges between unrelated nets are ill-conditioned, and float32
    rounding of W2 (W1 x) vs (W2 W1) x alone reaches 1e-4."""
    pool = build_fragment_pool({"a": plain_net(0).double(), "b": plain_net(1).double()}, "layer", (3, 8, 8))
    x = _randn(64, 3, 8, 8, seed=32).double()
    cfg = ComposeConfig(max_networks=12, threshold=0.0)
    plain = compose(pool, x, config=cfg, cache=False, progress=False)
    fused = compose(pool, x, config=cfg, fuse=True, cache=False, progress=False)
    assert [c.name for c in fused.candidates] == [c.name for c in plain.candidates]
    into_conv = [b for c in fused.candidates for b in c.bridges if "(fused)" in b and b.split(": ")[0].endswith(("[1]", "[2]"))]
    into_linear = [b for c in fused.candidates for b in c.bridges if "(fused)" in b and b.split(": ")[0].endswith("[3]")]
    assert into_conv and into_linear
    fresh = _randn(16, 3, 8, 8, seed=33).double() * 2
    a, b = plain.forward_many(fresh), fused.forward_many(fresh)
    for c, cf in zip(plain.candidates, fused.candidates):
        assert torch.allclose(a[c.id], b[cf.id], atol=1e-10), c.name
        assert cf.params <= c.params  # a folded bridge adds no parameters of its own


def test_block_pool_composes_the_anchors_first_with_their_own_outputs(resnets, block_pool) -> None:
    x = _randn(24, *SIZE, seed=40)
    comp = compose(block_pool, x, config=ComposeConfig(max_networks=4), cache=False, progress=False)
    anchors = [c for c in comp.candidates if c.is_anchor]
    assert [c.name for c in anchors] == ["cifar_resnet8[0-2]", "cifar_resnet14[0-5]"]
    assert [c.id for c in anchors] == [0, 1] and all(c.score == 1.0 and not c.bridges for c in anchors)
    fresh = _randn(5, *SIZE, seed=41)
    for c in anchors:
        model = resnets[c.name.split("[")[0]]
        assert torch.allclose(comp(fresh, c.id), model(fresh), atol=1e-6)
        assert c.params == num_params([model])
    scores = [c.score for c in comp.candidates]
    assert scores == sorted(scores, reverse=True) and all(s > 0.5 for s in scores)
    stitched = [c for c in comp.candidates if c.bridges]
    assert stitched and all(len(c.ckas) == len(c.fragments) - 1 for c in stitched)


def test_tight_memory_recomputes_evicted_activations_to_the_same_result(block_pool) -> None:
    x = _randn(24, *SIZE, seed=45)  # one 16x16x16 activation is 0.4 MB: 1 MB keeps about two
    roomy = compose(block_pool, x, config=ComposeConfig(max_networks=6), cache=False, progress=False)
    tight = compose(block_pool, x, config=ComposeConfig(max_networks=6, memory_mb=1), cache=False, progress=False)
    assert [(c.name, c.score) for c in tight.candidates] == [(c.name, c.score) for c in roomy.candidates]
    assert any(c.bridges for c in tight.candidates)
    a, b = roomy.forward_many(x), tight.forward_many(x)
    assert all(torch.equal(a[i], b[i]) for i in a)


def test_ridge_head_for_a_class_subset(block_pool) -> None:
    x = _randn(30, *SIZE, seed=50)
    y = torch.arange(30) % 2
    comp = compose(block_pool, x, y, ComposeConfig(max_networks=3), classes=[3, 5], cache=False, progress=False)
    assert comp.head == "ridge" and comp.num_classes == 2  # auto: a subset is a new task
    logits = comp.forward_many(x)
    assert all(v.shape == (30, 2) for v in logits.values())
    subset = compose(block_pool, x, y, ComposeConfig(max_networks=3, head="original"), classes=[3, 5], cache=False, progress=False)
    full = compose(block_pool, x, None, ComposeConfig(max_networks=3), cache=False, progress=False)
    assert torch.equal(subset(x, 0), full(x, 0)[:, [3, 5]])


def test_bad_input_gives_clear_errors(block_pool) -> None:
    x = _randn(8, *SIZE, seed=60)
    with pytest.raises(ValueError, match="at least 2 samples"):
        compose(block_pool, x[:0], progress=False)
    with pytest.raises(ValueError, match="non-empty batch"):
        pool_activations(block_pool, x[:0], cache=False, progress=False)
    with pytest.raises(NoCompositionError, match=r"no network reached an output fragment.*threshold T=0.999.*lower the threshold"):
        compose(block_pool, x, threshold=0.999, max_fragments=2, cache=False, progress=False)
    with pytest.raises(ValueError, match=r"cannot stitch a vector activation \(10,\) to a nchw one"):
        make_bridge(("vector", (10,), 0), ("nchw", (8, 4, 4), 0))
    with pytest.raises(ValueError, match="need y of shape"):
        compose(block_pool, x, None, head="ridge", num_classes=3, cache=False, progress=False)
    with pytest.raises(ValueError, match="head 'original' predicts the pool's 10 classes, but the task has 3"):
        compose(block_pool, x, head="original", num_classes=3, cache=False, progress=False)
    with pytest.raises(ValueError, match="span"):
        ComposeConfig(span=0)
    with pytest.raises(ValueError, match=r"unknown head 'knn'"):
        ComposeConfig(head="knn")


# ------------------------------------------------------------------------------ the module
def test_zero_epoch_fit_then_validate_reports_every_candidate(tmp_path) -> None:
    module = StitchNetModule(PoolConfig(models=["cifar_resnet8", "cifar_resnet14"], pretrained=False, input_size=SIZE),
                             ComposeConfig(max_networks=4), samples=40, cache=False, out_dir=str(tmp_path))
    dm = DigitsDataModule(data_config=module.data_config, batch_size=64, num_workers=0, classes=[3, 5])
    trainer = L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, dm)
    comp = module.composition
    assert comp is not None and comp.head == "ridge" and comp.num_classes == 2
    assert [r.id for r in module.results] == list(range(len(comp.candidates)))
    trainer.validate(module, dm, verbose=False)
    accs = [r.acc1 for r in module.results]
    assert all(a is not None and 0.0 <= a <= 100.0 for a in accs)
    independent = evaluate(comp, dm.val_dataloader(), progress=False)
    assert [c.acc1 for c in independent] == pytest.approx(accs, abs=1e-6)
    saved = json.loads((tmp_path / "val_stitchnet_candidates.json").read_text())
    assert [c["score"] for c in saved["candidates"]] == sorted((c["score"] for c in saved["candidates"]), reverse=True)
    assert saved["samples"] == 40 and saved["search"]["expansions"] > 0
    with pytest.raises(ValueError, match="max_epochs: 0"):
        L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False).fit(
            StitchNetModule(PoolConfig(models=["cifar_resnet8"], pretrained=False, input_size=SIZE), samples=8, cache=False), dm)


def test_datamodule_class_subset_relabels() -> None:
    from sklearn.datasets import load_digits

    full = DigitsDataModule(data_config={"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3}, num_workers=0)
    sub = DigitsDataModule(data_config=full.data_config, num_workers=0, classes=[5, 3])
    full.setup()
    sub.setup()
    full_labels = torch.tensor([full.val_set[i][1] for i in range(len(full.val_set))])
    sub_labels = torch.tensor(sub.val_set.targets)
    assert len(sub.val_set) == int(((full_labels == 3) | (full_labels == 5)).sum())
    assert torch.equal(sub_labels, torch.where(full_labels[(full_labels == 3) | (full_labels == 5)] == 5, 0, 1))
    _, y = sub.calibration_batch(20)
    assert set(y.tolist()) <= {0, 1}
    assert len(load_digits().target) == len(full.train_set) + len(full.val_set)
    with pytest.raises(ValueError, match=r"classes \[12\] do not occur"):
        DigitsDataModule(data_config=full.data_config, num_workers=0, classes=[3, 12]).setup()
    with pytest.raises(ValueError, match="at least 2 distinct"):
        DigitsDataModule(data_config=full.data_config, classes=[3, 3])


# ------------------------------------------------------------------------------ the paper's pool
# Each architecture cut at its stages (blocks named as a user would in YAML), as StitchNet's coarse fragments.
PAPER_POOL = {
    "alexnet": ["features.2", "features.5", "features.12"],
    "densenet121": [f"features.denseblock{i}" for i in range(1, 5)],
    "mobilenet_v3_small": ["features.1", "features.3", "features.8", "features.11"],
    "resnet50": ["layer1", "layer2", "layer3", "layer4"],
    "vgg16": ["features.4", "features.9", "features.16", "features.23", "features.30"],
}


@torch.no_grad()
def test_paper_pool_of_five_torchvision_architectures_composes_mixed_networks_exactly(tmp_path) -> None:
    """StitchNet's own pool (torchvision AlexNet, DenseNet-121, MobileNetV3-small, ResNet-50, VGG-16;
    random weights, 64 px, stage-level fragments): composed networks mix architectures, and each one's forward equals its
    fragments run by hand with bridges refitted by least squares from the same samples."""
    import torchvision

    from snnet.stitchnet.bridges import fit_bridge, in_spec, out_spec

    torch.manual_seed(0)
    models = {name: torchvision.models.get_model(name, weights=None).eval() for name in PAPER_POOL}
    size = (3, 64, 64)  # the smallest AlexNet takes (its third max-pool needs a 3x3 map)
    for name, blocks in PAPER_POOL.items():
        assert len(anchor_view(models[name], blocks=blocks, input_size=size).blocks) == len(blocks)  # the pool reuses these views
    pool = build_fragment_pool(models, "block", size)
    assert {f.source for f in pool.fragments} == set(PAPER_POOL)
    x = _randn(8, *size, seed=60)
    acts = pool_activations(pool, x, cache=False, progress=False)
    cfg = ComposeConfig(max_networks=12, threshold=0.0, head="original")
    comp = compose(pool, x, config=cfg, activations=acts, progress=False)
    sources = [{name.split("[")[0] for name in c.fragments} for c in comp.candidates]
    assert any(len(s) >= 2 for s in sources), [c.name for c in comp.candidates]
    for c in comp.candidates:
        frags = [pool.fragments[pool.index(*_parse(name))] for name in c.fragments]
        h = x
        for prev, f in zip([None, *frags], frags):
            if prev is not None and not (prev.source == f.source and prev.position + 1 == f.position):
                bridge = fit_bridge(make_bridge(out_spec(prev), in_spec(f)), h, acts.inputs[pool.fragments.index(f)],
                                    f.in_layout, cfg.bridge_ridge, cfg.batch_size)
                h = bridge(h)
            h = f.module(h)
        torch.testing.assert_close(comp(x, c.id), h, atol=1e-4, rtol=1e-3, msg=c.name)
        if c.is_anchor:
            torch.testing.assert_close(h, models[frags[0].source](x), atol=1e-4, rtol=1e-3)


def _parse(name: str) -> tuple[str, int]:
    source, position = name[:-1].split("[")
    return source, int(position)

"""Scoring every stitch in one pass (shared prefixes) vs the naive loop, on tiny CIFAR ResNets and the digits."""
import pytest
import torch
from timm.data import resolve_data_config
from torch.utils.flop_counter import FlopCounterMode

from snnet.sn_net.build import NetworkConfig, build_network
from snnet.data import DigitsDataModule
from snnet.deploy.evaluate import evaluate_stitches


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_network(NetworkConfig(anchors=["cifar_resnet8", "cifar_resnet14"], pretrained=False, input_size=(3, 16, 16)))


@pytest.fixture(scope="module")
def loader(net):
    cfg = {**resolve_data_config(model=net.anchors[0]), "input_size": (3, 16, 16)}
    return DigitsDataModule(data_config=cfg, eval_batch_size=16, val_limit=48, num_workers=0).val_dataloader()


def test_shared_pass_equals_naive_loop_and_a_direct_count(net, loader):
    ids = list(range(net.num_configs))[::-1]
    shared = evaluate_stitches(net, loader, ids, keep_predictions=True, progress=False)
    naive = evaluate_stitches(net, loader, ids, mode="naive", keep_predictions=True, progress=False)
    assert shared.results == naive.results
    assert [r.id for r in shared.results] == ids
    images, labels = map(torch.cat, zip(*loader))
    distinct = set()
    for r in shared.results:
        with torch.no_grad():
            logits = net.eval()(images, r.id)
        assert torch.equal(shared.predictions[r.id], logits.argmax(-1))
        assert torch.equal(naive.predictions[r.id], logits.argmax(-1))
        top5 = (logits.topk(5, dim=-1).indices == labels[:, None]).any(-1)
        assert r.acc1 == pytest.approx(100.0 * (logits.argmax(-1) == labels).double().mean().item(), abs=1e-4)
        assert r.acc5 == pytest.approx(100.0 * top5.double().mean().item(), abs=1e-4)
        distinct.add(tuple(shared.predictions[r.id].tolist()))
    assert len(distinct) > 1  # the stitches really differ, so equality above is not vacuous


def test_network_mode_is_restored(net, loader):
    net.train()
    evaluate_stitches(net, loader, [0], progress=False)
    assert net.training
    net.eval()


def test_shared_flops_count_every_distinct_prefix_once(net):
    ids = list(range(net.num_configs))
    for i in ids:
        assert net.forward_many_flops([i]) == net.infos[i].flops
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.eval().forward_many(torch.zeros(1, 3, 16, 16), ids)
    assert net.forward_many_flops(ids) == counter.get_total_flops()
    assert net.forward_many_flops(ids) < sum(net.infos[i].flops for i in ids)


def test_bad_input_is_a_clear_error(net, loader):
    with pytest.raises(ValueError, match=r"unknown evaluation mode 'fast'; choose one of \('shared', 'naive'\)"):
        evaluate_stitches(net, loader, mode="fast")
    n = net.num_configs
    with pytest.raises(IndexError, match=f"stitch id {n} out of range: valid ids are 0..{n - 1}"):
        evaluate_stitches(net, loader, [n])
    with pytest.raises(ValueError, match="no batches"):
        evaluate_stitches(net, [], progress=False)

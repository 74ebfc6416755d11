"""Least-squares init on the real pretrained CIFAR ResNets and real CIFAR-10 images (zero epochs):
stitches keep most of their anchor pair's accuracy."""
import pytest
import torch

from snnet.sn_net.build import NetworkConfig, build_network
from snnet.data import ImageFolderDataModule
from snnet.models.cifar_resnet import PRETRAINED_FILES


@pytest.mark.slow
def test_lstsq_stitches_keep_most_of_their_anchors_accuracy(anchor_dir, cifar10_root, cifar_data_config):
    net = build_network(NetworkConfig(
        anchors=["cifar_resnet20", "cifar_resnet32"], pretrained=False,
        checkpoints=[str(anchor_dir / PRETRAINED_FILES[20]), str(anchor_dir / PRETRAINED_FILES[32])],
    )).eval()
    dm = ImageFolderDataModule(str(cifar10_root), val_dir="test", data_config=cifar_data_config, val_limit=2000,
                               eval_batch_size=500, num_workers=2)
    dm.setup()
    images, _ = dm.calibration_batch(100)
    net.init_stitches_lstsq(images.split(50))
    ids = list(range(net.num_configs))
    correct = torch.zeros(len(ids))
    with torch.inference_mode():
        for x, y in dm.val_dataloader():
            outputs = net.forward_many(x, ids)
            correct += torch.stack([(outputs[i].argmax(-1) == y).sum() for i in ids])
    acc = correct / len(dm.val_set) * 100
    anchors, stitches = acc[: net.num_anchors], acc[net.num_anchors:]
    assert net.num_configs == 10 and anchors.min() > 75  # ~81-83 % on the full test set
    assert stitches.mean() > 0.75 * anchors.mean(), (anchors, stitches)  # most of the accuracy, untrained
    assert stitches.min() > 30, stitches  # every stitch far above chance (10 %)

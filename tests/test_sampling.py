import pytest
import torch

from snnet.sn_net.sampling import sample_stitch, sampling_weights, with_anchor_share


def test_uniform_weights_sum_to_one():
    w = sampling_weights([5, 1, 3, 9])
    torch.testing.assert_close(w, torch.full((4,), 0.25, dtype=torch.float64))


def test_flops_groups_are_equally_likely():
    flops = [1, 2, 3, 4, 100]  # 4 cheap configs in one bin, 1 expensive in another
    w = sampling_weights(flops, "flops", groups=2)
    assert w.sum().item() == pytest.approx(1.0)
    assert w[4].item() == pytest.approx(0.5) and w[:4].sum().item() == pytest.approx(0.5)


def test_sample_is_a_pure_function_of_seed_and_step():
    w = sampling_weights(range(71))
    first = [sample_stitch(w, seed=3, step=s) for s in range(200)]
    again = [sample_stitch(w, seed=3, step=s) for s in range(200)]
    other = [sample_stitch(w, seed=4, step=s) for s in range(200)]
    assert first == again and first != other
    assert len(set(first)) > 50  # covers the space


def test_bad_strategy_names_choices():
    with pytest.raises(ValueError, match=r"'uniform', 'flops'"):
        sampling_weights([1, 2], "sandwich")


def test_anchor_share_gives_the_anchors_that_share_and_keeps_the_stitches_proportions():
    w = with_anchor_share(sampling_weights([1, 2, 3, 4, 100], "flops", groups=2), num_anchors=2, share=0.5)
    assert w.sum().item() == pytest.approx(1.0)
    assert w[:2].tolist() == pytest.approx([0.25, 0.25])
    assert w[2:].tolist() == pytest.approx([1 / 12, 1 / 12, 1 / 3])  # the flops bins' 1:1:4 kept
    assert with_anchor_share(w, 2, 0.0)[:2].tolist() == [0.0, 0.0]
    only_anchors = sampling_weights([1, 2])
    assert torch.equal(with_anchor_share(only_anchors, 2, 0.5), only_anchors)
    with pytest.raises(ValueError, match=r"anchor_share must be in \[0, 1\], got 1.5"):
        with_anchor_share(w, 2, 1.5)

"""General-stitching adapters: layouts, rescaling, the registry, and exact least-squares init."""
import pytest
import torch
import torch.nn as nn

from snnet.general_stitching.adapters import ADAPTERS, Adapter, create_adapter, init_lstsq, register_adapter

# (in_shape, out_shape, in_layout, out_layout, in_prefix, out_prefix)
LAYOUT_CASES = {
    "map->map same grid": ((8, 6, 6), (12, 6, 6), "nchw", "nchw", 0, 0),
    "map->map downsample": ((8, 8, 8), (12, 4, 4), "nchw", "nchw", 0, 0),
    "map->map upsample": ((8, 4, 4), (12, 8, 8), "nchw", "nchw", 0, 0),
    "map->tokens+cls": ((8, 8, 8), (17, 12), "nchw", "tokens", 0, 1),
    "tokens+cls->map": ((17, 8), (12, 8, 8), "tokens", "nchw", 1, 0),
    "tokens->tokens same": ((17, 8), (17, 12), "tokens", "tokens", 1, 1),
    "nhwc->map": ((8, 8, 8), (12, 4, 4), "nhwc", "nchw", 0, 0),
    "map->nhwc": ((8, 8, 8), (4, 4, 12), "nchw", "nhwc", 0, 0),
    "map->vector": ((8, 4, 4), (12,), "nchw", "vector", 0, 0),
}


def affine_target(adapter: Adapter, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The receiver activation a known affine map gives, in the receiver's layout (via the adapter's own
    layout conversion, so the test checks the fit, not the conversion twice)."""
    m = adapter.to_map(x)[:, :, :: adapter.stride, :: adapter.stride]
    return adapter.from_map(torch.einsum("oc,bchw->bohw", weight, m) + bias[:, None, None])


@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_every_adapter_produces_the_receiver_shape(name, case):
    in_shape, out_shape, in_layout, out_layout, pin, pout = LAYOUT_CASES[case]
    adapter = create_adapter(name, in_shape, out_shape, in_layout, out_layout, bn_before=True, bn_after=True,
                             in_prefix_tokens=pin, out_prefix_tokens=pout)
    assert adapter(torch.randn(3, *in_shape)).shape == (3, *out_shape)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("case", ["map->map same grid", "map->map downsample", "map->tokens+cls", "tokens+cls->map", "tokens->tokens same"])
def test_lstsq_recovers_a_known_affine_map_exactly(case, bn):
    torch.manual_seed(0)
    in_shape, out_shape, in_layout, out_layout, pin, pout = LAYOUT_CASES[case]
    adapter = create_adapter("linear", in_shape, out_shape, in_layout, out_layout, bn_before=bn, bn_after=bn,
                             in_prefix_tokens=pin, out_prefix_tokens=pout)
    c_in, c_out = adapter.in_channels, adapter.out_channels
    weight, bias = torch.randn(c_out, c_in), torch.randn(c_out)
    x = torch.randn(40, *in_shape) * 3 + 1  # non-standardised, so BN-before really changes the rows
    y = affine_target(adapter, x, weight, bias)
    init_lstsq(adapter, x, y)
    torch.testing.assert_close(adapter.eval()(x), y, rtol=0, atol=2e-4)
    if not bn:
        torch.testing.assert_close(adapter.core.proj.weight.flatten(1), weight, rtol=0, atol=1e-4)
        torch.testing.assert_close(adapter.core.proj.bias, bias, rtol=0, atol=1e-4)


def test_lstsq_with_stride2_reads_every_other_position():
    torch.manual_seed(0)
    adapter = create_adapter("linear", (6, 8, 8), (5, 4, 4), "nchw", "nchw", rescale="stride2")
    assert adapter.stride == 2 and adapter.core.proj.stride == (2, 2)
    weight, bias = torch.randn(5, 6), torch.randn(5)
    x = torch.randn(30, 6, 8, 8)
    y = torch.einsum("oc,bchw->bohw", weight, x[:, :, ::2, ::2]) + bias[:, None, None]
    init_lstsq(adapter, x, y)
    torch.testing.assert_close(adapter.eval()(x), y, rtol=0, atol=1e-4)


def test_lstsq_fitted_bottleneck_starts_as_relu_of_the_fitted_linear_map():
    torch.manual_seed(0)
    shapes = ((8, 8, 8), (12, 4, 4), "nchw", "nchw")
    x, y = torch.randn(40, 8, 8, 8), torch.randn(40, 12, 4, 4)
    linear, bottleneck = (create_adapter(n, *shapes, bn_before=True, bn_after=True) for n in ("linear", "bottleneck"))
    init_lstsq(linear, x, y)
    init_lstsq(bottleneck, x, y)
    torch.testing.assert_close(bottleneck.eval()(x), torch.relu(linear.eval()(x)), rtol=0, atol=1e-4)


def test_class_token_into_tokens_is_the_mean_of_the_patch_tokens():
    adapter = create_adapter("conv3x3_relu", (8, 4, 4), (17, 12), "nchw", "tokens", out_prefix_tokens=1)
    out = adapter(torch.randn(2, 8, 4, 4))
    torch.testing.assert_close(out[:, 0], out[:, 1:].mean(dim=1))


def test_tokens_to_same_tokens_keep_the_class_token_through_a_linear_adapter():
    adapter = create_adapter("linear", (17, 8), (17, 8), "tokens", "tokens", in_prefix_tokens=1, out_prefix_tokens=1)
    with torch.no_grad():
        adapter.core.proj.weight.copy_(torch.eye(8)[:, :, None, None])
        adapter.core.proj.bias.zero_()
    x = torch.randn(2, 17, 8)
    torch.testing.assert_close(adapter(x), x)


def test_stride2_needs_a_grid_exactly_twice_the_receivers():
    assert create_adapter("conv3x3_relu", (8, 8, 8), (8, 8, 8), "nchw", "nchw", rescale="stride2").stride == 1
    with pytest.raises(ValueError, match=r"exactly twice the receiver grid \(2, 2\).*rescale='bilinear'"):
        create_adapter("conv3x3_relu", (8, 8, 8), (8, 2, 2), "nchw", "nchw", rescale="stride2")


def test_no_rescale_keeps_the_sender_grid():
    adapter = create_adapter("linear", (8, 8, 8), (12, 4, 4), "nchw", "nchw", rescale="none")
    assert adapter(torch.randn(2, 8, 8, 8)).shape == (2, 12, 8, 8)
    with pytest.raises(ValueError, match="one grid"):
        init_lstsq(adapter, torch.randn(4, 8, 8, 8), torch.randn(4, 12, 4, 4))


def test_bad_names_list_the_valid_choices():
    with pytest.raises(ValueError, match=r"unknown adapter 'mlp'; choose one of \['bottleneck', 'conv3x3_relu', 'linear', 'linear_relu'\]"):
        create_adapter("mlp", (8, 4, 4), (8, 4, 4), "nchw", "nchw")
    with pytest.raises(ValueError, match=r"unknown rescale 'nearest'; choose one of \('bilinear', 'stride2', 'none'\)"):
        create_adapter("linear", (8, 4, 4), (8, 4, 4), "nchw", "nchw", rescale="nearest")
    with pytest.raises(ValueError, match="does not fit layout 'nchw'"):
        create_adapter("linear", (8, 4), (8, 4, 4), "nchw", "nchw")


def test_lstsq_on_an_adapter_without_linear_path_names_those_with_one():
    adapter = create_adapter("conv3x3_relu", (8, 4, 4), (8, 4, 4), "nchw", "nchw")
    with pytest.raises(ValueError, match=r"linear path \['linear', 'linear_relu', 'bottleneck'\], not 'conv3x3_relu'"):
        init_lstsq(adapter, torch.randn(4, 8, 4, 4), torch.randn(4, 8, 4, 4))


def test_registered_adapter_is_created_by_name():
    @register_adapter("test_identity_pad")
    def identity_pad(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    try:
        adapter = create_adapter("test_identity_pad", (8, 8, 8), (3, 4, 4), "nchw", "nchw", rescale="stride2")
        assert isinstance(adapter.core, nn.Conv2d) and adapter.core.stride == (2, 2)
    finally:
        del ADAPTERS["test_identity_pad"]

"""torch.compile of a stitchable network: one graph per configuration, never recompiled on a
revisit, and a compiled (and bf16) training step that matches eager."""
import lightning as L
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from helpers import tiny_data, tiny_module
from snnet.sn_net.build import NetworkConfig, build_network
from snnet.sn_net.compile import compile_stitchable


@pytest.fixture
def fresh_dynamo():
    """Dynamo's defaults (8 graphs per frame) and an empty cache, whatever ran before."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        yield
    torch._dynamo.reset()


def test_one_graph_per_configuration_reused_on_revisit(fresh_dynamo):
    torch.manual_seed(0)
    net = build_network(NetworkConfig(anchors=["cifar_resnet8", "cifar_resnet14", "cifar_resnet20"], pretrained=False,
                                      input_size=(3, 16, 16))).eval()
    assert net.num_configs > 8  # more than dynamo's default cache: without the raised limit, the 9th runs eager
    counter = CompileCounter()
    compiled = compile_stitchable(net, backend=counter)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for sweep in range(2):
            for stitch in range(net.num_configs):
                net.set_stitch(stitch)
                torch.testing.assert_close(compiled(x), net(x, stitch))
            assert counter.frame_count == net.num_configs  # the second sweep compiles nothing


def fit_steps(tmp_path, steps: int, precision: str = "32-true", **module_kwargs) -> L.LightningModule:
    module = tiny_module(teacher="largest_anchor", **module_kwargs)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_checkpointing=False, deterministic=True, default_root_dir=tmp_path, precision=precision)
    trainer.fit(module, tiny_data(module))
    return module


def test_compiled_training_matches_eager(tmp_path, fresh_dynamo):
    """aot_eager runs dynamo and AOTAutograd (the compiled path) without inductor's C++ build time."""
    eager = fit_steps(tmp_path / "eager", steps=3)
    compiled = fit_steps(tmp_path / "compiled", steps=3, compile=True, compile_options={"backend": "aot_eager"})
    assert compiled.forward_fn is not compiled.net and compiled.teacher_fn is not compiled.teacher
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)  # NaN: not measured in either


def test_bf16_mixed_precision_trains_in_bfloat16(tmp_path):
    module = tiny_module(teacher="largest_anchor")
    dtypes = set()
    first_conv = module.net.views[0].model.conv1
    first_conv.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    before = [p.detach().clone() for p in module.net.stitch_layers.parameters()]
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_checkpointing=False, default_root_dir=tmp_path, precision="bf16-mixed")
    trainer.fit(module, tiny_data(module))
    assert torch.bfloat16 in dtypes
    assert all(p.dtype == torch.float32 for p in module.parameters())  # master weights stay float32
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, module.net.stitch_layers.parameters()))

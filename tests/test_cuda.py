"""snnet on a GPU: what CPU runs cannot show (tensors made on the wrong device, float64 least squares,
BatchNorm calibration, compile, bf16, FSDP, serving and latency on CUDA).

Marked ``cuda``; they run on ``SNNET_TEST_DEVICE`` (default ``cuda``) and skip, saying why, where
that is CUDA and torch sees no GPU. ``tools/device_check.py --smoke`` runs the quick ones
(``-m "cuda and not slow"``) with ``SNNET_TEST_DEVICE=cpu``, so their logic runs in CI too; the slow
ones have CPU twins in test_resume.py, test_serve.py and test_deploy.py.
"""
from __future__ import annotations

import base64
import io
import os

import pytest
import requests
import torch
from PIL import Image

from helpers import (SERVE_HEADERS, assert_forward_many_is_one_at_a_time, assert_killed_and_resumed_equals_uninterrupted,
                     perturbed_network, start_server, stop_server)
from snnet.sn_net.build import NetworkConfig, build_network
from snnet.results import load_results

DEVICE = torch.device(os.environ.get("SNNET_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                       reason="torch sees no CUDA GPU (set SNNET_TEST_DEVICE=cpu to run these tests' logic on the CPU)"),
]
CIFAR = NetworkConfig(anchors=["cifar_resnet8", "cifar_resnet14"], pretrained=False, input_size=(3, 16, 16))
VIT = NetworkConfig(anchors=["deit_tiny_patch16_224", "deit_small_patch16_224"], pretrained=False,
                    model_kwargs={"img_size": 32, "depth": 4, "num_classes": 10}, input_size=(3, 32, 32))
FAMILIES = [pytest.param(CIFAR, id="cifar-resnet"), pytest.param(VIT, id="deit")]


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g) * 2 + 0.5


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """``|actual - expected| <= rel * |expected|`` in the Frobenius norm (float64, on the CPU)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    error = (a - e).norm() / e.norm().clamp_min(1e-30)
    assert error <= rel, f"{what}: relative error {error:.2e} > {rel:.0e}"


@pytest.mark.parametrize("config", FAMILIES)
def test_least_squares_init_on_the_device_equals_the_cpu(config):
    """Float64 normal equations accumulated on the device: every stitching layer within 1e-4 of the CPU's."""
    torch.manual_seed(0)
    cpu = build_network(config).eval()
    device = build_network(config).eval()
    device.load_state_dict(cpu.state_dict())
    device.to(DEVICE)
    x = images(64, config.input_size[-1])
    cpu.init_stitches_lstsq(x.split(32))
    device.init_stitches_lstsq([b.to(DEVICE) for b in x.split(32)])
    for i, (a, b) in enumerate(zip(device.stitch_layers, cpu.stitch_layers)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert p.device.type == DEVICE.type
            assert_relative(p, q, 1e-4, f"stitching layer {i} {name}")


@pytest.mark.parametrize("config", FAMILIES)
def test_forward_many_and_forward_rows_equal_forward_per_stitch(config):
    torch.manual_seed(0)
    net = build_network(config).eval().to(DEVICE)
    x = images(6, config.input_size[-1]).to(DEVICE)
    assert_forward_many_is_one_at_a_time(net, x)  # the same kernels on the same batch: bit for bit
    ids = [(3 * r) % net.num_configs for r in range(x.shape[0])]
    with torch.no_grad():
        rows = net.forward_rows(x, ids)
        assert rows.device.type == DEVICE.type
        for r, stitch in enumerate(ids):  # a row subset is a smaller batch: other kernels, float rounding
            torch.testing.assert_close(rows[r], net(x[r:r + 1], stitch)[0], rtol=1e-4, atol=1e-5)


def test_batchnorm_calibration_on_the_device_equals_the_cpu():
    cpu = perturbed_network(CIFAR)
    device = perturbed_network(CIFAR).to(DEVICE)
    batches = images(48, 16).split(16)
    assert cpu.calibrate_batchnorm(batches) == device.calibrate_batchnorm([b.to(DEVICE) for b in batches]) == 48
    for (name, a), b in zip(device.bn_bank.state_dict().items(), cpu.bn_bank.state_dict().values()):
        assert a.device.type == DEVICE.type
        if a.is_floating_point():
            assert_relative(a, b, 1e-4, name)
        else:
            assert torch.equal(a.cpu(), b), name
    x = images(4, 16, seed=2)
    with torch.no_grad():
        for stitch in range(cpu.num_configs):
            assert_relative(device(x.to(DEVICE), stitch), cpu(x, stitch), 1e-4, f"stitch {stitch}")


def test_export_and_load_on_the_device(tmp_path):
    from snnet.deploy.export import export_stitch, load_program, load_stitch

    net = perturbed_network(CIFAR).to(DEVICE)
    net.calibrate_batchnorm([b.to(DEVICE) for b in images(32, 16).split(16)])
    stitch = net.num_configs - 1
    export_stitch(net, stitch, tmp_path)
    loaded = load_stitch(tmp_path, device=DEVICE)
    program = load_program(tmp_path).module()
    x = images(3, 16, seed=2).to(DEVICE)
    with torch.no_grad():
        reference = net(x, stitch)
        assert next(loaded.parameters()).device.type == DEVICE.type
        torch.testing.assert_close(loaded(x), reference, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(program(x), reference, rtol=1e-4, atol=1e-5)


def test_compiled_stitch_equals_eager():
    """Inductor on a GPU; on the CPU aot_eager (dynamo and AOTAutograd without a C++ build)."""
    import torch._dynamo

    from snnet.sn_net.compile import compile_stitchable

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = build_network(CIFAR).eval().to(DEVICE)
    compiled = compile_stitchable(net, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    x = images(4, 16).to(DEVICE)
    with torch.no_grad():
        for stitch in (0, net.num_configs - 1):
            net.set_stitch(stitch)
            torch.testing.assert_close(compiled(x), net(x, stitch), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


FITS = [
    pytest.param({"precision": "bf16-mixed"}, id="bf16-mixed"),
    pytest.param({"precision": "32-true", "strategy": "fsdp"}, id="fsdp", marks=pytest.mark.skipif(
        DEVICE.type != "cuda", reason="FSDP needs a CUDA device (Lightning and torch refuse FSDP on CPU)")),
]


@pytest.mark.slow
@pytest.mark.parametrize("run", FITS)
def test_fit_on_one_device_killed_and_resumed_equals_uninterrupted(run, tmp_path):
    """`snnet fit` on one device (bf16-mixed; FSDP through Lightning's FSDPStrategy): finite loss,
    every stitch evaluated, and a kill -9 at step 9 resumed bit-exact."""
    assert_killed_and_resumed_equals_uninterrupted(tmp_path, accelerator=DEVICE.type, **run)
    rows = load_results(tmp_path / "full" / "fit_results.json")
    assert len(rows) == build_network(CIFAR).num_configs
    assert all(r.acc1 is not None and 0 <= r.acc1 <= 100 for r in rows)
    state = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())  # no NaN/inf step was taken


def png(size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(images(1, size)[0].permute(1, 2, 0).clamp(0, 1).mul(255).byte().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_serve_on_the_device_answers_as_the_network(quickstart):
    from snnet.serve.launch import eval_transform, read_checkpoint

    ckpt, results = quickstart
    proc, url = start_server(ckpt, results, "--api-key", SERVE_HEADERS["X-API-Key"], "--device", str(DEVICE),
                             "--slo-ms", "60000")
    try:
        image = png()
        answer = requests.post(url + "/predict", json={"image": base64.b64encode(image).decode(), "stitch": 1},
                               headers=SERVE_HEADERS, timeout=120)
        assert answer.status_code == 200, answer.text
        net, _ = read_checkpoint(ckpt)
        with torch.inference_mode():
            probs = net(eval_transform(net)(Image.open(io.BytesIO(image)).convert("RGB"))[None], 1).softmax(-1)[0]
        top = answer.json()["top"]
        assert top[0]["class"] == int(probs.argmax())
        assert abs(top[0]["prob"] - float(probs.max())) < 1e-3
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_bench_latency_on_the_device(quickstart, tmp_path):
    from snnet.cli import main

    ckpt, results = quickstart
    out = tmp_path / "latency.json"
    main(["bench", "latency", "--ckpt", str(ckpt), "--results", str(results), "--device", str(DEVICE),
          "--warmup", "2", "--repeats", "3", "--out", str(out)])
    timed = load_results(out)
    assert len(timed) == len(load_results(results))
    assert all(r.latency_ms is not None and r.latency_ms > 0 for r in timed)

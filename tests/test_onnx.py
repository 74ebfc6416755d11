"""ONNX export: ONNX Runtime answers as the PyTorch stitch (CNN and ViT families, random weights; the
quickstart's trained network), a file per front stitch, the export-time check's failures, and ONNX
Runtime latencies feeding `snnet select --max-latency-ms`."""
import json

import pytest
import torch

from helpers import perturbed_network
from snnet.cli import main
from snnet.deploy.export import extract_stitch
from snnet.deploy.onnx import OnnxCheckError, check_onnx, export_onnx, onnx_latency, read_exports, session
from snnet.errors import WriteError
from snnet.results import load_results, pareto_front
from snnet.serve.launch import read_checkpoint
from snnet.sn_net.build import NetworkConfig

CNN = NetworkConfig(anchors=["cifar_resnet20_w4", "cifar_resnet20_w8"], pretrained=False, input_size=(3, 16, 16))
VIT = NetworkConfig(anchors=["deit_tiny_patch16_224", "deit_small_patch16_224"], pretrained=False,
                    model_kwargs={"img_size": 32, "depth": 3, "num_classes": 10})
TOLERANCE = 1e-4  # float32 logits; the export-time check's own default (snnet.deploy.onnx.ATOL)


def assert_runtime_equals_network(folder, net, ids, batch=5):
    """Every ONNX file in ``folder``, run by ONNX Runtime on a batch of another size than the traced
    one, equals the network's stitch; its JSON describes that stitch."""
    metas = read_exports(folder)
    assert [m["id"] for m in metas] == sorted(ids)
    x = torch.randn(batch, *net.profiles[0].input_size)
    for meta in metas:
        (out,) = session(folder / meta["file"]).run(["logits"], {"image": x.numpy()})
        with torch.no_grad():
            reference = net(x, meta["id"])
        assert (torch.from_numpy(out) - reference).abs().max() < TOLERANCE, meta["name"]
        info = net.infos[meta["id"]]
        assert (meta["name"], meta["flops"], meta["params"], meta["is_anchor"]) == (info.name, info.flops, info.params, info.is_anchor)
        assert meta["input"]["shape"] == ["batch", *net.profiles[0].input_size]
        assert meta["input"]["preprocessing"]["mean"] == list(net.data_config()["mean"])
        assert 0 <= meta["check"]["max_abs_diff"] <= meta["check"]["atol"]


@pytest.mark.parametrize("config", [CNN, VIT], ids=["cifar_resnet20_widths", "vit"])
def test_onnx_runtime_equals_pytorch_for_an_anchor_and_a_stitch(config, tmp_path):
    net = perturbed_network(config)
    anchor = next(i.id for i in net.infos if i.is_anchor)
    stitch = net.num_configs - 1
    assert not net.infos[stitch].is_anchor
    paths = export_onnx(net, [anchor, stitch], tmp_path / "onnx", progress=False)
    assert [p.name for p in paths] == [f"stitch-{anchor}.onnx", f"stitch-{stitch}.onnx"]
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted(
        [f"stitch-{anchor}.json", f"stitch-{anchor}.onnx", f"stitch-{stitch}.json", f"stitch-{stitch}.onnx"])
    assert_runtime_equals_network(tmp_path / "onnx", net, [anchor, stitch])


def test_a_rejected_or_differing_file_fails_naming_it_nothing_is_left_and_latency_needs_every_file(tmp_path):
    net = perturbed_network(CNN)
    x = torch.randn(3, 3, 16, 16)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    with pytest.raises(OnnxCheckError, match=f"ONNX Runtime rejects {garbage}"):
        check_onnx(garbage, extract_stitch(net, 0).eval(), x)

    export_onnx(net, [0], tmp_path / "good", progress=False)
    other = extract_stitch(net, 1).eval()  # another anchor: same input and output shapes, other logits
    with pytest.raises(OnnxCheckError, match=r"stitch-0.onnx: ONNX Runtime differs from PyTorch by up to \d"):
        check_onnx(tmp_path / "good" / "stitch-0.onnx", other, x)

    # a zero tolerance: float32 kernels differ in summation order, so the export-time check fails
    with pytest.raises(OnnxCheckError, match=r"differs from PyTorch by up to .* \(tolerance 0 \+ 0 x \|PyTorch\|\)"):
        export_onnx(net, [0, net.num_configs - 1], tmp_path / "strict", atol=0.0, rtol=0.0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.onnx", "good"]  # no strict/, no partial folder

    with pytest.raises(WriteError, match="good exists and is not an empty folder"):
        export_onnx(net, [0], tmp_path / "good", progress=False)

    latency = onnx_latency(tmp_path / "good", batch_size=2, warmup=1, repeats=2, threads=1, progress=False)
    assert list(latency) == [0] and latency[0] > 0
    (tmp_path / "good" / "stitch-0.onnx").unlink()
    with pytest.raises(ValueError, match="stitch-0.json describes .*stitch-0.onnx, which is missing"):
        onnx_latency(tmp_path / "good")


def test_the_trained_front_as_onnx_with_onnx_runtime_latencies_for_select(quickstart, tmp_path, capsys):
    """`snnet export --format onnx --front` on the quickstart's checkpoint: one file per front stitch,
    each equal to the trained network; `snnet bench latency --runtime onnxruntime` times them and
    `snnet select --max-latency-ms` chooses among them."""
    ckpt, results = quickstart
    net, names = read_checkpoint(ckpt)
    front = [r.id for r in pareto_front(load_results(results))]
    out = tmp_path / "front"
    main(["export", "--ckpt", str(ckpt), "--format", "onnx", "--front", "--results", str(results), "--out", str(out)])
    assert sorted(p.name for p in out.glob("*.onnx")) == sorted(f"stitch-{i}.onnx" for i in front)
    assert_runtime_equals_network(out, net, front)
    measured = {r.id: r for r in load_results(results)}
    for meta in read_exports(out):
        assert meta["acc1"] == measured[meta["id"]].acc1 and meta["class_names"] == names

    main(["bench", "latency", "--runtime", "onnxruntime", "--onnx", str(out), "--warmup", "1", "--repeats", "3"])
    timed = load_results(out / "results.json")
    assert [r.id for r in timed] == sorted(front) and all(r.latency_ms > 0 for r in timed)
    capsys.readouterr()
    main(["select", "--results", str(out / "results.json"), "--max-latency-ms", str(max(r.latency_ms for r in timed))])
    chosen = json.loads(capsys.readouterr().out)
    assert chosen["id"] == max(timed, key=lambda r: (r.acc1, -r.flops)).id

"""The Hub-style folder: `snnet export --format pretrained` on the quickstart's checkpoint, rebuilt by
`from_pretrained` in a fresh process with identical outputs for every stitch, clear errors for a
corrupted folder or an unreachable repo id, `snnet serve` from the folder, and `push_to_hub` uploading it."""
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests
import torch
from huggingface_hub import HfApi
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from snnet.cli import main
from snnet.deploy.pretrained import PretrainedError, from_pretrained, push_to_hub
from snnet.results import load_results
from snnet.serve.launch import eval_transform, read_checkpoint
from snnet.serve.process import start_serve

ROOT = Path(__file__).parents[1]
FILES = ["README.md", "config.json", "model.safetensors", "pareto.png", "results.csv", "results.json"]
pytestmark = pytest.mark.slow
FRESH = """
import sys, torch
from snnet.deploy.pretrained import from_pretrained
net = from_pretrained(sys.argv[1]).net
torch.manual_seed(0)
x = torch.randn(4, 3, 16, 16)
with torch.no_grad():
    torch.save({s: net(x, s) for s in range(net.num_configs)}, sys.argv[2])
"""


def env(**more) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **more}


@pytest.fixture(scope="module")
def saved(quickstart, tmp_path_factory):
    ckpt, results = quickstart
    folder = tmp_path_factory.mktemp("pretrained") / "quickstart"
    main(["export", "--ckpt", str(ckpt), "--format", "pretrained", "--results", str(results), "--out", str(folder)])
    return folder


def test_a_fresh_process_rebuilds_every_stitch_from_the_folder_alone(quickstart, saved, tmp_path):
    ckpt, results = quickstart
    net, names = read_checkpoint(ckpt)
    assert sorted(p.name for p in saved.iterdir()) == FILES and not list(saved.parent.glob(".*partial"))
    with safe_open(str(saved / "model.safetensors"), "pt") as f:  # every anchor and stitching layer, once
        assert set(f.keys()) == set(net.state_dict())
    config = json.loads((saved / "config.json").read_text())
    assert config["network"]["checkpoints"] is None and config["network"]["pretrained"] is False  # no anchor file, no download
    assert config["class_names"] == names and [s["name"] for s in config["stitches"]] == [i.name for i in net.infos]
    assert load_results(saved / "results.json") == load_results(results)
    card = (saved / "README.md").read_text()
    assert "library_name: snnet" in card and "![accuracy vs GFLOPs of every stitch](pareto.png)" in card
    assert all(f"| {i.id} | {i.name}" in card for i in net.infos)

    shutil.move(str(quickstart[0].parents[1] / "anchors"), tmp_path / "anchors_away")  # the anchor files are not read
    try:
        outputs = tmp_path / "outputs.pt"
        subprocess.run([sys.executable, "-c", FRESH, str(saved), str(outputs)], env=env(HF_HUB_OFFLINE="1"), check=True)
    finally:
        shutil.move(str(tmp_path / "anchors_away"), quickstart[0].parents[1] / "anchors")
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    loaded = torch.load(outputs)
    assert sorted(loaded) == list(range(net.num_configs))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fresh process (OMP_NUM_THREADS=1): the same kernels, so equal bit for bit
    try:
        with torch.no_grad():
            for stitch, y in loaded.items():
                assert torch.equal(y, net(x, stitch)), stitch
    finally:
        torch.set_num_threads(threads)


def test_the_folder_stands_in_for_checkpoint_and_results_in_select_and_export(quickstart, saved, tmp_path, capsys):
    _, results = quickstart
    budget = ["--max-gflops", str(sorted(r.gflops for r in load_results(results))[len(load_results(results)) // 2])]
    capsys.readouterr()
    main(["select", "--results", str(results), *budget])
    from_file = json.loads(capsys.readouterr().out)
    main(["select", "--results", str(saved), *budget])
    assert json.loads(capsys.readouterr().out) == from_file
    main(["export", "--ckpt", str(saved), "--format", "onnx", *budget, "--out", str(tmp_path / "onnx")])  # the folder's own results
    meta = json.loads((tmp_path / "onnx" / f"stitch-{from_file['id']}.json").read_text())
    assert (meta["id"], meta["name"], meta["acc1"]) == (from_file["id"], from_file["name"], from_file["acc1"])


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_corrupted_folder_is_refused_naming_the_file(saved, tmp_path, capsys):
    def broken(name, change):
        folder = tmp_path / name
        shutil.copytree(saved, folder)
        change(folder)
        return folder

    def other_weights(folder):  # weights of another shape, and a config.json whose checksum matches them
        save_file({"anchors.0.conv1.weight": torch.zeros(1)}, folder / "model.safetensors")
        config = json.loads((folder / "config.json").read_text())
        config["weights"]["sha256"] = None
        (folder / "config.json").write_text(json.dumps(config))

    def flipped(folder):
        data = bytearray((folder / "model.safetensors").read_bytes())
        data[-10] ^= 0xFF
        (folder / "model.safetensors").write_bytes(bytes(data))

    cases = [
        (broken("no_weights", lambda f: (f / "model.safetensors").unlink()), "model.safetensors not found"),
        (broken("flipped", flipped), "model.safetensors does not match config.json (SHA-256 differs)"),
        (broken("other", other_weights), "model.safetensors does not fit the network of config.json"),
        (broken("no_config", lambda f: (f / "config.json").unlink()), "config.json not found"),
        (broken("bad_results", lambda f: (f / "results.json").write_text("[{")), "results.json: not valid JSON"),
    ]
    for folder, message in cases:
        err = refused(["export", "--ckpt", str(folder), "--format", "onnx", "--stitch", "0", "--out", str(tmp_path / "o")], capsys)
        assert message in err and str(folder) in err, err
        with pytest.raises(PretrainedError if "results" not in message else ValueError, match="not|does"):
            from_pretrained(folder)
    assert not (tmp_path / "o").exists()


def test_a_repo_id_without_network_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "snnet.cli", "select", "--results", "someone/stitched", "--max-gflops", "1"],
                         env=env(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf")), capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 2
    assert run.stderr.strip().startswith("snnet select: someone/stitched: no such local file or folder, and Hub repo "
                                         "'someone/stitched' could not be downloaded"), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_serve_starts_from_a_saved_folder_and_answers_as_the_network(quickstart, saved):
    from snnet.data import DigitsDataModule

    net, names = read_checkpoint(quickstart[0])
    dm = DigitsDataModule(data_config={"input_size": (3, 16, 16)})
    dm.setup()
    buffer = io.BytesIO()
    Image.fromarray(dm.val_set.images[0]).save(buffer, format="PNG")
    with tempfile.TemporaryFile("w+") as log:
        proc, url = start_serve(["--ckpt", str(saved), "--policy", "fixed", "--stitch", "0", "--device", "cpu"], env(), 600,
                                stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        answer_as_the_network(proc, url, net, names, buffer.getvalue())


def answer_as_the_network(proc, url, net, names, image: bytes) -> None:
    """Two stitches' answers to ``image`` equal the network's top-5 (then the server is stopped)."""
    try:
        for stitch in (0, net.num_configs - 1):
            answer = requests.post(url + "/predict", json={"image": base64.b64encode(image).decode(), "stitch": stitch},
                                   timeout=60).json()
            with torch.inference_mode():
                probs = net(eval_transform(net)(Image.open(io.BytesIO(image)).convert("RGB"))[None], stitch).softmax(-1)[0]
            values, indices = probs.topk(5)
            assert answer["stitch"]["id"] == stitch
            assert [t["class"] for t in answer["top"]] == indices.tolist()
            assert [t["name"] for t in answer["top"]] == [names[i] for i in indices.tolist()]
            assert [t["prob"] for t in answer["top"]] == pytest.approx(values.tolist(), rel=1e-4, abs=1e-6)
    finally:  # SIGTERM drains the server; then its whole process group (HTTP process, worker) goes
        proc.terminate()
        try:
            proc.wait(60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def test_push_to_hub_uploads_the_saved_folder_and_never_a_broken_one(saved, tmp_path, monkeypatch):
    """No network in tests: huggingface_hub's two calls are recorded instead of sent."""
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw)) or "commit-url")
    assert push_to_hub(saved, "me/stitched") == "commit-url"
    assert [c[:2] for c in calls] == [("create", "me/stitched"), ("upload", "me/stitched")]
    assert calls[1][2]["folder_path"] == str(saved) and calls[0][2]["exist_ok"]

    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(PretrainedError, match="model.safetensors not found"):
        push_to_hub(broken, "me/stitched")
    assert len(calls) == 2


def test_push_to_hub_without_network_is_one_line_and_keeps_the_folder(saved, tmp_path):
    out = tmp_path / "pushed"
    run = subprocess.run([sys.executable, "-m", "snnet.cli", "export", "--ckpt", str(saved), "--format", "pretrained",
                          "--push-to-hub", "me/stitched", "--out", str(out)],
                         env=env(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), HF_TOKEN="hf_test"),
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith(f"snnet export: cannot upload {out} to the Hub repo me/stitched: "), line
    assert line.endswith(f"the folder is complete: upload it later with `hf upload me/stitched {out}`"), line
    assert from_pretrained(out).net.num_configs > 0

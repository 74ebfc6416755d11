"""Every command, run as a user runs it (a subprocess), with bad input: exit code 2, no traceback,
one line on stderr that names the bad value. One row per case; the rows run two at a time up
front (subprocess start-up dominates) and each test checks its own row."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning
import pytest
import torch
import yaml
from safetensors.torch import save_file

from helpers import tiny_module
from snnet.checkpoint_write import AtomicCheckpointIO
from snnet.deploy.onnx import FORMAT as ONNX_FORMAT
from snnet.front import stitch_result
from snnet.results import save_results
from snnet.serve.process import free_port

ROOT = Path(__file__).resolve().parents[1]
NETWORK = {"anchors": ["cifar_resnet8", "cifar_resnet14"], "pretrained": False, "input_size": [3, 16, 16]}

# (case id, argv with {placeholders} for the fixture's files, text the error line must hold)
CASES = [
    ("unknown-command", ["train"], "unknown command 'train'"),
    # LightningCLI commands: parsing
    ("fit-missing-config", ["fit", "--config", "{tmp}/nope.yaml"], "{tmp}/nope.yaml"),
    ("fit-unknown-model-key", ["fit", "--config", "{fit}", "--model.init_args.netwrk.anchors", "[a]"],
     "unknown key 'model.init_args.netwrk.anchors'; valid keys of model.init_args: "),
    ("fit-unknown-key-in-file", ["fit", "--config", "{typo}"], "did you mean 'model.init_args.optim.lr'?"),
    ("fit-unknown-trainer-key", ["fit", "--config", "{fit}", "--trainer.max_stepz", "3"], "did you mean 'trainer.max_steps'?"),
    ("fit-unknown-data-key", ["fit", "--config", "{fit}", "--data.init_args.batch_sise", "3"], "did you mean 'data.init_args.batch_size'?"),
    ("fit-wrong-type", ["fit", "--config", "{fit}", "--trainer.max_steps", "abc"], "trainer.max_steps: expected int, got 'abc'"),
    # LightningCLI commands: building the model and data
    ("fit-unknown-anchor", ["fit", "--config", "{fit}", "--model.init_args.network.anchors", "[cifar_resnet8, resnet_nope]"],
     "unknown anchor model 'resnet_nope'"),
    ("fit-missing-anchor-file", ["fit", "--config", "{fit}", "--model.init_args.network.checkpoints", "[{tmp}/nope.safetensors, null]"],
     "{tmp}/nope.safetensors"),
    ("fit-anchor-file-does-not-fit", ["fit", "--config", "{fit}", "--model.init_args.network.checkpoints", "[{bad_anchor}, null]"],
     "checkpoint {bad_anchor} does not fit anchor 'cifar_resnet8': 36 missing weights (e.g. bn1.weight"),
    ("fit-batch-size-0", ["fit", "--config", "{fit}", "--data.init_args.batch_size", "0"], "batch_size must be >= 1, got 0"),
    ("fit-unset-env-var", ["fit", "--config", "{images_fit}", "--data.init_args.root", "${SNNET_TEST_UNSET}/x"], "${SNNET_TEST_UNSET}"),
    ("fit-missing-data-folder", ["fit", "--config", "{images_fit}", "--data.init_args.root", "{tmp}/no_images"], "{tmp}/no_images/train"),
    ("fit-corrupt-image", ["fit", "--config", "{images_fit}"], "image {images}/train/a/1.jpg cannot be read"),
    # --ckpt_path
    ("validate-missing-ckpt", ["validate", "--config", "{fit}", "--ckpt_path", "{tmp}/nope.ckpt"], "checkpoint not found: {tmp}/nope.ckpt"),
    ("validate-folder-ckpt", ["validate", "--config", "{fit}", "--ckpt_path", "{tmp}"], "--ckpt_path {tmp} is a folder"),
    ("validate-other-network-ckpt", ["validate", "--config", "{other_fit}", "--ckpt_path", "{ckpt}"],
     "--ckpt_path {ckpt} holds another network than the config: network.anchors is ['cifar_resnet8', 'cifar_resnet14'] in the checkpoint"),
    ("fit-other-network-ckpt", ["fit", "--config", "{other_fit}", "--ckpt_path", "{ckpt}"], "holds another network"),
    ("validate-ckpt-not-from-a-trainer", ["validate", "--config", "{fit}", "--ckpt_path", "{bare_ckpt}"],
     "--ckpt_path {bare_ckpt}: not written by a Lightning Trainer"),
    # predict
    ("predict-stitch-out-of-range", ["predict", "--config", "{fit}", "--ckpt_path", "{ckpt}", "--model.init_args.predict.stitch", "99"],
     "stitch id 99 out of range: valid ids are 0..3"),
    ("predict-budget-without-results", ["predict", "--config", "{fit}", "--model.init_args.predict.max_gflops", "1"], "needs predict.results"),
    ("predict-negative-budget", ["predict", "--config", "{fit}", "--model.init_args.predict.max_gflops", "-1",
                                 "--model.init_args.predict.results", "{results}"], "max_gflops must be a finite positive number, got -1"),
    # select: results files and budgets
    ("select-missing-results", ["select", "--results", "{tmp}/nope.json", "--max-gflops", "1"], "results file not found: {tmp}/nope.json"),
    ("select-results-not-json", ["select", "--results", "{not_json}", "--max-gflops", "1"], "results file {not_json}: not valid JSON"),
    ("select-nan-accuracy-row-0", ["select", "--results", "{nan_acc}", "--max-gflops", "1"], "row 0: stitch 0 ('cifar_resnet8'): acc1 must be a finite"),
    ("select-negative-flops", ["select", "--results", "{negative_flops}", "--max-gflops", "1"], "flops must be a finite non-negative number, got -5"),
    ("select-string-accuracy", ["select", "--results", "{string_acc}", "--max-gflops", "1"], "acc1 must be a finite non-negative number or null, got 'high'"),
    ("select-nan-budget", ["select", "--results", "{results}", "--max-gflops", ".nan"], "max_gflops must be a finite positive number, got nan"),
    ("select-infinite-budget", ["select", "--results", "{results}", "--max-params", ".inf"], "max_params must be a finite positive number, got inf"),
    ("select-negative-budget", ["select", "--results", "{results}", "--max-gflops", "-1"], "max_gflops must be a finite positive number, got -1"),
    ("select-no-budget", ["select", "--results", "{results}"], "give at least one budget"),
    ("select-budget-too-small", ["select", "--results", "{results}", "--max-gflops", "0.000001"], "max gflops 1e-06 is below the cheapest stitch 0"),
    ("select-bad-metric", ["select", "--results", "{results}", "--max-gflops", "1", "--metric", "acc9"], "'acc9'"),
    # export
    ("export-results-of-another-network", ["export", "--ckpt", "{ckpt}", "--results", "{renamed}", "--max-gflops", "1", "--out", "{tmp}/e1"],
     "results file {renamed}: the results name stitch 3"),
    ("export-out-is-a-file", ["export", "--ckpt", "{ckpt}", "--stitch", "1", "--out", "{not_json}"], "--out {not_json} is a file"),
    ("export-out-uncreatable", ["export", "--ckpt", "{ckpt}", "--stitch", "1", "--out", "{not_json}/sub"], "--out {not_json}/sub: cannot create the folder"),
    ("export-stitch-out-of-range", ["export", "--ckpt", "{ckpt}", "--stitch", "9", "--out", "{tmp}/e2"], "stitch id 9 out of range"),
    ("export-stitch-and-budget", ["export", "--ckpt", "{ckpt}", "--stitch", "1", "--max-gflops", "1", "--results", "{results}", "--out", "{tmp}/e3"],
     "give a stitch id (1) or a budget, not both"),
    ("export-bad-hub-repo-id", ["export", "--ckpt", "{ckpt}", "--format", "pretrained", "--push-to-hub", "bad repo!!", "--out", "{tmp}/e6"],
     "'bad repo!!'"),
    ("export-missing-ckpt", ["export", "--ckpt", "{tmp}/nope.ckpt", "--stitch", "1", "--out", "{tmp}/e4"], "checkpoint not found: {tmp}/nope.ckpt"),
    ("export-not-a-checkpoint", ["export", "--ckpt", "{not_json}", "--stitch", "1", "--out", "{tmp}/e5"], "checkpoint {not_json}: not a PyTorch checkpoint"),
    # stitches, bench, similarity
    ("stitches-bad-bool", ["stitches", "--anchors", "cifar_resnet8", "cifar_resnet14", "--pretrained", "maybe"], "pretrained: expected bool, got 'maybe'"),
    ("stitches-unknown-option", ["stitches", "--anchors", "cifar_resnet8", "--widths", "3"], "unknown key 'widths'"),
    ("stitches-unknown-network-key", ["stitches", "--config", "{typo_network}"], "unknown key 'kernel'; valid keys: anchors"),
    ("bench-unknown-measurement", ["bench", "speed"], "unknown measurement 'speed'"),
    ("bench-latency-batch-0", ["bench", "latency", "--ckpt", "{ckpt}", "--results", "{results}", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("bench-latency-results-of-another-network", ["bench", "latency", "--ckpt", "{ckpt}", "--results", "{renamed}"], "measured on another network"),
    ("similarity-unknown-key", ["similarity", "--sender.nme", "x"], "did you mean 'sender.name'?"),
    # serve (every check before the banner)
    ("serve-port-taken", ["serve", "--ckpt", "{ckpt}", "--results", "{results}", "--port", "{port}"], "cannot listen on 127.0.0.1:{port}"),
    ("serve-fixed-without-stitch", ["serve", "--ckpt", "{ckpt}", "--results", "{results}", "--policy", "fixed"], "--policy fixed needs --stitch"),
    ("serve-results-of-another-network", ["serve", "--ckpt", "{ckpt}", "--results", "{renamed}", "--port", "{free_port}"],
     "results file {renamed} does not describe checkpoint {ckpt}"),
    ("serve-port-below-1024", ["serve", "--ckpt", "{ckpt}", "--results", "{results}", "--port", "80"],
     "--port must be in 1024..65535 (LitServe's range), got 80"),
    ("serve-infinite-slo", ["serve", "--ckpt", "{ckpt}", "--results", "{results}", "--slo-ms", ".inf"],
     "slo_ms must be a finite positive number, got inf"),
    ("serve-nan-margin", ["serve", "--ckpt", "{ckpt}", "--results", "{results}", "--margin", ".nan"], "margin must be in (0, 1], got nan"),
    ("serve-nan-batch-timeout", ["serve", "--ckpt", "{ckpt}", "--results", "{results}", "--batch-timeout-ms", ".nan"],
     "batch_timeout_ms must be a finite number >= 0, got nan"),
    ("serve-infinite-payload", ["serve", "--ckpt", "{ckpt}", "--results", "{results}", "--max-payload-mb", ".inf"],
     "max_payload_mb must be a finite positive number, got inf"),
    # ONNX export and ONNX Runtime timing
    ("export-onnx-out-uncreatable", ["export", "--ckpt", "{ckpt}", "--format", "onnx", "--stitch", "1", "--out", "{not_json}/sub"],
     "{not_json}/sub: cannot create the folder"),
    ("bench-threads-with-pytorch", ["bench", "latency", "--ckpt", "{ckpt}", "--results", "{results}", "--threads", "2"],
     "--threads 2: is for --runtime onnxruntime"),
    ("bench-onnx-with-dtype", ["bench", "latency", "--runtime", "onnxruntime", "--onnx", "{onnx_incomplete}", "--dtype", "float16"],
     "--dtype float16 --device cpu: --runtime onnxruntime times the exported float32 files on the CPU"),
    ("bench-onnx-threads-0", ["bench", "latency", "--runtime", "onnxruntime", "--onnx", "{onnx_incomplete}", "--threads", "0"],
     "--threads 0: must be >= 1"),
    ("bench-onnx-incomplete-description", ["bench", "latency", "--runtime", "onnxruntime", "--onnx", "{onnx_incomplete}"],
     "{onnx_incomplete}/stitch-0.json: an snnet ONNX description without file, input"),
]


def _fit_config(tmp: Path, network: dict, data: dict) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {"max_steps": 1, "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0, "limit_val_batches": 1,
                    "default_root_dir": str(tmp / "out")},
        "model": {"class_path": "snnet.sn_net.module.SNNetModule", "init_args": {
            "network": network, "optim": {"lr": 0.001, "warmup_steps": 1}, "distill": {"teacher": None},
            "stitch_init": {"images": 8, "batch_size": 8}, "bn_calibration": {"images": 0}}},
        "data": data,
    }


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> dict[str, str]:
    """One tiny checkpoint, results of its network, and the bad files the cases feed in."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("bad_inputs")
    module = tiny_module(teacher=None)
    ckpt = tmp / "last.ckpt"
    saved = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 1}
    AtomicCheckpointIO().save_checkpoint({**saved, "pytorch-lightning_version": lightning.__version__}, ckpt)
    AtomicCheckpointIO().save_checkpoint(saved, tmp / "bare.ckpt")  # weights and hyper-parameters only
    rows = [stitch_result(module.net, i.id, acc1=50.0 + i.id) for i in module.net.table()]
    save_results(rows, tmp / "results.json")

    def variant(name: str, index: int, key: str, value) -> str:
        data = [r.to_dict() for r in rows]
        data[index][key] = value
        (tmp / f"{name}.json").write_text(json.dumps(data))
        return str(tmp / f"{name}.json")

    digits = {"class_path": "snnet.data.DigitsDataModule", "init_args": {"batch_size": 8, "train_limit": 16, "val_limit": 8, "num_workers": 0}}
    images = tmp / "images"
    for split in ("train", "val"):
        for label in ("a", "b"):
            (images / split / label).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(images / split / label / f"{i}.jpg")
    (images / "train" / "a" / "1.jpg").write_bytes((images / "train" / "a" / "0.jpg").read_bytes()[:100])  # truncated
    folder = {"class_path": "snnet.data.ImageFolderDataModule",
              "init_args": {"root": str(images), "batch_size": 2, "num_workers": 0}}
    configs = {
        "fit": _fit_config(tmp, NETWORK, digits),
        "other_fit": _fit_config(tmp, {**NETWORK, "anchors": ["cifar_resnet8", "cifar_resnet20"]}, digits),
        "images_fit": _fit_config(tmp, NETWORK, folder),
    }
    typo = _fit_config(tmp, NETWORK, digits)
    typo["model"]["init_args"]["optim"]["lr_rate"] = 0.1
    configs["typo"] = typo
    configs["typo_network"] = {"network": {**NETWORK, "kernel": 3}}
    out = {name: str(tmp / f"{name}.yaml") for name in configs}
    for name, config in configs.items():
        Path(out[name]).write_text(yaml.safe_dump(config))
    save_file({"conv1.weight": torch.zeros(3, 3, 3, 3)}, tmp / "bad_anchor.safetensors")
    (tmp / "not_json.json").write_text('[{"id": 0,')
    (tmp / "onnx_incomplete").mkdir()
    (tmp / "onnx_incomplete" / "stitch-0.json").write_text(json.dumps({"format": ONNX_FORMAT, "id": 0, "name": "cifar_resnet8"}))
    return {
        **out, "tmp": str(tmp), "ckpt": str(ckpt), "results": str(tmp / "results.json"), "images": str(images),
        "onnx_incomplete": str(tmp / "onnx_incomplete"), "bad_anchor": str(tmp / "bad_anchor.safetensors"), "bare_ckpt": str(tmp / "bare.ckpt"), "not_json": str(tmp / "not_json.json"),
        "nan_acc": variant("nan_acc", 0, "acc1", float("nan")), "negative_flops": variant("negative_flops", 1, "flops", -5),
        "string_acc": variant("string_acc", 2, "acc1", "high"),
        "renamed": variant("renamed", 3, "name", "cifar_resnet8[0:9] -> cifar_resnet14[1:]"),
    }


@pytest.fixture(scope="session")
def runs(files, request) -> dict[str, tuple[subprocess.CompletedProcess, str, str]]:
    """Every selected case run once, two at a time: (process, its expected text, its command line)."""
    selected = {item.callspec.params["name"] for item in request.session.items
                if hasattr(item, "callspec") and "name" in item.callspec.params}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        values = {**files, "port": str(taken.getsockname()[1]), "free_port": str(free_port())}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "WANDB_MODE": "disabled"}
        env.pop("SNNET_TEST_UNSET", None)

        def fill(text: str) -> str:  # {name} from the fixture; ${VAR} stays for snnet to expand
            return re.sub(r"(?<!\$)\{(\w+)\}", lambda m: values[m[1]], text)

        def run(case):
            name, argv, expected = case
            argv = [fill(a) for a in argv]
            done = subprocess.run([sys.executable, "-m", "snnet.cli", *argv], capture_output=True, text=True, timeout=300,
                                  env=env, cwd=files["tmp"])
            return name, (done, fill(expected), " ".join(argv))

        with ThreadPoolExecutor(max_workers=2) as pool:
            return dict(pool.map(run, [c for c in CASES if c[0] in selected]))


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_value(runs, name):
    done, expected, command = runs[name]
    output = done.stdout + done.stderr
    assert done.returncode == 2, f"snnet {command}: exit {done.returncode}\n{output[-3000:]}"
    assert "Traceback" not in output, f"snnet {command}:\n{output[-3000:]}"
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("snnet") and expected in line, f"snnet {command}: {line!r} lacks {expected!r}"

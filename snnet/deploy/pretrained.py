"""A trained stitchable network as one Hugging Face Hub-style folder, and back, from a folder or a repo id.

``save_pretrained`` writes into a new folder (whole or not at all):

- ``model.safetensors``: the network's state (every anchor and stitching layer once, per-path
  BatchNorm statistics included);
- ``config.json``: what rebuilds it without the training config or any anchor file or download:
  the network config with weights left out (anchor specs, stitch space), the stitch table (id, name),
  the input preprocessing, the class names, and the weights' SHA-256;
- ``results.json`` / ``results.csv``: the per-stitch table; ``pareto.png``: its plot where accuracies are known;
- ``README.md``: a model card (Hub metadata, the plot, the table, how it was trained, how to load it).

``from_pretrained`` takes such a folder, or a Hub repo id (``owner/name`` or ``hf-hub:owner/name``,
fetched with ``huggingface_hub.snapshot_download``), checks every file against ``config.json`` and
rebuilds the network; ``push_to_hub`` uploads a saved folder with ``HfApi.upload_folder``.
``load_trained`` is what the commands use: a folder, a repo id or an ``snnet fit`` checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from snnet.checkpoint_io import read_checkpoint, state_mismatch
from snnet.deploy.staging import staged_folder
from snnet.errors import BadFileError, WriteError, one_line, read_json
from snnet.front import stitch_result
from snnet.results import StitchResult, load_results, markdown_table, plot_pareto, save_results
from snnet.sn_net.build import NetworkConfig, build_network
from snnet.sn_net.network import StitchableNetwork

FORMAT = "snnet-pretrained/1"
CONFIG, WEIGHTS, RESULTS, RESULTS_CSV, PLOT, CARD = (
    "config.json", "model.safetensors", "results.json", "results.csv", "pareto.png", "README.md")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_PREFIX = "hf-hub:"


class PretrainedError(BadFileError):
    """A pretrained folder or repo that cannot be used: the message names the file or repo and why."""


@dataclass
class TrainedNetwork:
    """A trained network with what deployment needs besides it.

    ``local``: the folder or checkpoint it was read from (a repo id's download folder);
    ``results``: the folder's per-stitch table (None for a checkpoint); ``training``: how it was trained.
    """

    net: StitchableNetwork
    network: NetworkConfig
    local: Path
    class_names: list[str] | None = None
    results: list[StitchResult] | None = None
    training: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def save_pretrained(
    net: StitchableNetwork,
    network: NetworkConfig,
    out_dir: str | os.PathLike,
    results: Sequence[StitchResult] | None = None,
    class_names: Sequence[str] | None = None,
    training: dict[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """Write ``net`` (built from ``network``) as a Hub-style folder ``out_dir`` (must be new or empty).

    ``results``: measured per-stitch accuracies (``snnet validate``; default: costs only);
    ``training``: how it was trained (hyper-parameters, epochs), shown in the model card.
    """
    if net.is_language_model:
        raise ValueError("a pretrained folder (--format pretrained) is for image families so far; a language model exports one stitch with --format torch")
    if len(network.specs()) != len(net.anchors):
        raise ValueError(f"the network config has {len(network.specs())} anchors but the network {len(net.anchors)}")
    rows = list(results) if results is not None else [stitch_result(net, i.id) for i in net.infos]
    by_id = {r.id: r.name for r in rows}
    wrong = [r.id for r in rows if r.id >= net.num_configs or net.infos[r.id].name != by_id[r.id]]
    if wrong or len(by_id) != net.num_configs:
        raise ValueError(f"the results do not describe this network's {net.num_configs} stitches (ids {wrong or sorted(by_id)})")
    with staged_folder(out_dir) as tmp:
        state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt", "snnet": FORMAT})
        config = {
            "format": FORMAT,
            "network": _jsonable(dataclasses.asdict(network.without_weights())),
            "stitches": [{"id": i.id, "name": i.name} for i in net.infos],
            "preprocessing": _jsonable(net.data_config()),
            "num_classes": int(net.anchors[-1].num_classes),
            "class_names": None if class_names is None else [str(n) for n in class_names],
            "weights": {"file": WEIGHTS, "sha256": _sha256(tmp / WEIGHTS), "tensors": len(state)},
            "training": _jsonable(training or {}),
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=1))
        save_results(rows, tmp / RESULTS, tmp / RESULTS_CSV)
        scored = all(r.acc1 is not None for r in rows)
        if scored:
            plot_pareto(rows, tmp / PLOT, title=title)
        (tmp / CARD).write_text(model_card(net, config, rows, scored, title))
    return Path(out_dir)


def model_card(net: StitchableNetwork, config: dict[str, Any], rows: Sequence[StitchResult], plot: bool, title: str | None) -> str:
    """The folder's README.md: Hub metadata (``huggingface_hub.ModelCardData``), plot, table, training, loading."""
    from huggingface_hub import ModelCardData

    anchors = ", ".join(net.anchor_names)
    data = ModelCardData(library_name="snnet", pipeline_tag="image-classification",
                         tags=["stitchable-neural-networks", "sn-net", "image-classification"])
    flops = sorted(r.gflops for r in rows)
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {title or 'Stitchable network: ' + anchors}", "",
        (f"One stitchable network (SN-Net) of the anchors {anchors}: {len(rows)} stitches from {flops[0]:.4g} to "
         f"{flops[-1]:.4g} GFLOPs per image, input {list(net.profiles[0].input_size)}, {config['num_classes']} classes. "
         "Every stitch runs from these weights; choose one per device or budget."), "",
    ]
    if plot:
        lines += ["![accuracy vs GFLOPs of every stitch](pareto.png)", ""]
    lines += ["## Stitches", "", markdown_table(rows), "",
              "`results.json` / `results.csv` hold this table.", ""]
    training = config["training"]
    lines += ["## How it was trained", ""]
    if training:
        lines += ["```json", json.dumps(training, indent=1), "```", ""]
    else:
        lines += ["Not recorded.", ""]
    lines += [
        "## How to load", "",
        "```python",
        "from snnet.deploy.pretrained import from_pretrained",
        "",
        'model = from_pretrained("<this folder or owner/repo>")  # no anchor download: every weight is here',
        "net = model.net  # StitchableNetwork, eval mode; net(images, stitch_id)",
        "```", "",
        "```bash",
        "snnet select --results <folder or repo> --max-gflops 0.005          # the best stitch within a budget",
        "snnet serve --ckpt <folder or repo>                                 # every stitch over HTTP",
        "snnet export --ckpt <folder or repo> --stitch ID --format onnx --out onnx/",
        "```", "",
        (f"Files: `{WEIGHTS}` (weights), `{CONFIG}` (the network config, stitch table, preprocessing "
         f"{json.dumps(config['preprocessing'])}, class names), `{RESULTS}`, `{RESULTS_CSV}`."), "",
    ]
    return "\n".join(lines)


def is_repo_id(source: str | os.PathLike) -> bool:
    """``hf-hub:owner/name``, or ``owner/name`` that is no local path and names no checkpoint file."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        return True
    return not Path(text).exists() and REPO_ID.fullmatch(text) is not None and not text.endswith(".ckpt")


def pretrained_folder(source: str | os.PathLike, revision: str | None = None, token: str | None = None,
                      cache_dir: str | None = None) -> Path | None:
    """The local folder of ``source`` (a folder, or a repo id downloaded with ``snapshot_download``);
    None when ``source`` is something else (a checkpoint file)."""
    if Path(source).is_dir():
        return Path(source)
    if not is_repo_id(source):
        return None
    from huggingface_hub import snapshot_download

    repo = str(source).removeprefix(HUB_PREFIX)
    try:
        return Path(snapshot_download(repo, revision=revision, token=token, cache_dir=cache_dir))
    except (OSError, ValueError) as e:  # huggingface_hub's HTTP, offline and validation errors derive from these
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PretrainedError(f"{source}: no such local file or folder, and Hub repo {repo!r} could not be downloaded "
                              f"({type(e).__name__}: {reason})") from None


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise PretrainedError(f"{path} not found: is {folder} a folder written by `snnet export --format pretrained`?")
    config = read_json(path, error=PretrainedError)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise PretrainedError(f"{path}: format {config.get('format') if isinstance(config, dict) else None!r}, expected {FORMAT!r}")
    return config


def from_pretrained(source: str | os.PathLike, revision: str | None = None, token: str | None = None,
                    cache_dir: str | None = None) -> TrainedNetwork:
    """The network of a folder written by :func:`save_pretrained`, or of a Hub repo holding one (eval
    mode, CPU). Every file is checked against ``config.json``: a mismatch names the file."""
    folder = pretrained_folder(source, revision, token, cache_dir)
    if folder is None:
        raise PretrainedError(f"{source}: not a folder or a Hub repo id (owner/name)")
    config = _read_config(folder)
    try:
        network = NetworkConfig(**config["network"])
        net = build_network(network)
    except (KeyError, TypeError, ValueError) as e:
        raise PretrainedError(f"{folder / CONFIG}: its network does not build here: {e}") from None
    names = [s.get("name") for s in config.get("stitches", [])]
    if names != [i.name for i in net.infos]:
        raise PretrainedError(f"{folder / CONFIG}: lists {len(names)} stitches but its network builds {net.num_configs} "
                              "others: written by another snnet version, or edited")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise PretrainedError(f"{weights} not found: the folder has no weights")
    expected = (config.get("weights") or {}).get("sha256")
    if expected is not None and _sha256(weights) != expected:
        raise PretrainedError(f"{weights} does not match {CONFIG} (SHA-256 differs): the weights were changed or truncated")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise PretrainedError(f"{weights}: not a readable safetensors file ({e})") from None
    mismatch = state_mismatch(net.state_dict(), state)
    if mismatch:
        raise PretrainedError(f"{weights} does not fit the network of {CONFIG} ({mismatch})")
    net.load_state_dict(state, strict=True)
    results = None
    if (folder / RESULTS).is_file():
        results = load_results(folder / RESULTS)
        if [r.name for r in results] != names:
            raise PretrainedError(f"{folder / RESULTS} does not list the stitches of {CONFIG}")
    return TrainedNetwork(net.eval(), network, folder, config.get("class_names"), results, config.get("training") or {})


def _class_names(checkpoint: dict) -> list[str] | None:
    """The class names a checkpoint's datamodule state saved (``snnet.data``), or None."""
    names = next((v["class_names"] for v in checkpoint.values() if isinstance(v, dict) and "class_names" in v), None)
    return None if names is None else [str(n) for n in names]


def load_trained(source: str | os.PathLike) -> TrainedNetwork:
    """A pretrained folder, a Hub repo id, or an ``snnet fit`` checkpoint (with its class names and training)."""
    if pretrained_folder(source) is not None:
        return from_pretrained(source)
    from snnet.deploy.load import load_network

    net, network = load_network(source)
    checkpoint = read_checkpoint(source)
    hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k not in ("network", "_class_path")}
    training = {"epochs": checkpoint.get("epoch", -1) + 1, "steps": checkpoint.get("global_step"), "module": hparams,
                "data": checkpoint.get("datamodule_hyper_parameters")}
    return TrainedNetwork(net, network, Path(source), _class_names(checkpoint), None,
                          {k: v for k, v in training.items() if v is not None})


def results_of(source: str | os.PathLike) -> list[StitchResult]:
    """The per-stitch results of a results JSON, or those a pretrained folder or repo holds."""
    folder = pretrained_folder(source)
    if folder is None:
        return load_results(source)
    if not (folder / RESULTS).is_file():
        raise PretrainedError(f"{folder / RESULTS} not found: the pretrained folder has no results table")
    return load_results(folder / RESULTS)


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload stitchable network (snnet)") -> str:
    """Upload a folder written by :func:`save_pretrained` (checked first) to the Hub repo ``repo_id``
    (created if needed) with ``HfApi.upload_folder``; returns the commit URL."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    from_pretrained(folder)  # a folder that does not load is never uploaded
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, repo_type="model"))
    except Exception as e:  # the Hub's HTTP errors and its HTTP library's connection errors share no public base
        raise WriteError(f"cannot upload {folder} to the Hub repo {repo_id}: {one_line(e)}; the folder is complete: "
                         f"upload it later with `hf upload {repo_id} {folder}`") from e


def check_repo_id(repo_id: str) -> None:
    """A ValueError naming ``repo_id`` when the Hub would refuse it (checked before anything is written)."""
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)  # HFValidationError, a ValueError naming the id and the rule

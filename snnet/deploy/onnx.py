"""Stitches as ONNX files, each checked against PyTorch by ONNX Runtime when it is written, and their
latency under ONNX Runtime.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` then ONNX Script) on the
standalone module of :func:`snnet.export.extract_stitch`, with a dynamic batch dimension. Each
``stitch-<id>.onnx`` has a ``stitch-<id>.json`` beside it: id, name, FLOPs, parameters, the measured
accuracy where results were given, the input's preprocessing (timm data config) and the check's
maximum difference. A file is kept only when ONNX Runtime loads it and its output on a sample batch
(another batch size than the traced one) is within ``atol + rtol * |PyTorch|`` of the PyTorch stitch.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from snnet.deploy.export import extract_stitch
from snnet.deploy.latency import median_ms
from snnet.deploy.staging import staged_folder
from snnet.errors import BadFileError, read_json
from snnet.results import StitchResult
from snnet.sn_net.network import StitchableNetwork

FORMAT = "snnet-onnx/1"
INPUT, OUTPUT = "image", "logits"
# float32 kernels of ONNX Runtime and PyTorch differ in summation order: measured differences on the
# tests' and the quickstart's networks are ~1e-6 of logits of order 1-10; these leave two decades of margin
ATOL = 1e-4
RTOL = 1e-4
TRACE_BATCH, CHECK_BATCH = 2, 3
DESCRIPTION_KEYS = ("file", "id", "name", "input")  # what reading an export needs of each stitch-*.json


class OnnxCheckError(ValueError):
    """ONNX Runtime rejected an exported file, or its output differs from PyTorch's beyond the tolerance."""


@dataclass
class OnnxCheck:
    """What the export-time check measured: ONNX Runtime vs PyTorch on a random batch of ``batch`` images."""

    runtime: str
    batch: int
    max_abs_diff: float
    atol: float
    rtol: float


def file_names(stitch: int) -> tuple[str, str]:
    return f"stitch-{stitch}.onnx", f"stitch-{stitch}.json"


def session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session of ``path``; a file it rejects raises :class:`OnnxCheckError` naming it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's pybind errors (InvalidGraph, Fail, NoSuchFile...) share no base but Exception
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxCheckError(f"ONNX Runtime rejects {path}: {first}") from None


def check_onnx(path: str | os.PathLike, module: torch.nn.Module, x: Tensor, atol: float = ATOL, rtol: float = RTOL) -> OnnxCheck:
    """ONNX Runtime's output of ``path`` on ``x`` against ``module(x)`` (float32, CPU); raises
    :class:`OnnxCheckError` with the maximum difference when any element is beyond ``atol + rtol * |ref|``."""
    import onnxruntime as ort

    x = x.detach().to("cpu", torch.float32)
    with torch.inference_mode():
        reference = module.to("cpu", torch.float32)(x).numpy()
    (output,) = session(path).run([OUTPUT], {INPUT: x.numpy()})
    if output.shape != reference.shape:
        raise OnnxCheckError(f"{path}: ONNX Runtime output shape {output.shape} but PyTorch's is {reference.shape}")
    diff = np.abs(output - reference)
    worst = float(diff.max())
    if not np.isfinite(worst) or (diff > atol + rtol * np.abs(reference)).any():
        raise OnnxCheckError(f"{path}: ONNX Runtime differs from PyTorch by up to {worst:.3g} on a batch of {len(x)} "
                             f"(tolerance {atol:g} + {rtol:g} x |PyTorch|)")
    return OnnxCheck(f"onnxruntime {ort.__version__}", len(x), worst, atol, rtol)


def write_onnx(module: torch.nn.Module, input_size: Sequence[int], path: Path) -> None:
    """``module`` (eval, float32) as one self-contained ONNX file with a dynamic batch dimension."""
    x = torch.randn(TRACE_BATCH, *input_size)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        torch.onnx.export(module, (x,), str(path), dynamo=True, dynamic_shapes=({0: batch},), input_names=[INPUT],
                          output_names=[OUTPUT], external_data=False, verbose=False)


def export_onnx(
    net: StitchableNetwork,
    stitches: Sequence[int],
    out_dir: str | os.PathLike,
    results: Sequence[StitchResult] | None = None,
    class_names: Sequence[str] | None = None,
    atol: float = ATOL,
    rtol: float = RTOL,
    progress: bool = True,
) -> list[Path]:
    """Write ``stitch-<id>.onnx`` and ``stitch-<id>.json`` for each of ``stitches`` into the new folder
    ``out_dir`` (written whole or not at all), each checked by ONNX Runtime; returns the ONNX paths.

    ``results`` (same network) add each stitch's measured accuracy to its JSON; ``class_names`` name the outputs.
    """
    if net.is_language_model:
        raise ValueError("ONNX export (--format onnx) is for image families so far; a language model exports one stitch with --format torch")
    ids = [net.check_id(s) for s in stitches]
    measured = {r.id: r for r in results or []}
    input_size = list(net.profiles[0].input_size)
    preprocessing = {k: list(v) if isinstance(v, tuple) else v for k, v in net.data_config().items()}
    written = []
    with staged_folder(out_dir) as tmp:
        for stitch in tqdm(ids, desc="ONNX export", disable=not progress or len(ids) < 2):
            onnx_name, json_name = file_names(stitch)
            module = extract_stitch(net, stitch).to("cpu", torch.float32).eval()
            write_onnx(module, input_size, tmp / onnx_name)
            check = check_onnx(tmp / onnx_name, module, torch.randn(CHECK_BATCH, *input_size), atol, rtol)
            info, result = net.infos[stitch], measured.get(stitch)
            meta: dict[str, Any] = {
                "format": FORMAT, "file": onnx_name, "id": info.id, "name": info.name, "flops": info.flops,
                "params": info.params, "is_anchor": info.is_anchor,
                "acc1": None if result is None else result.acc1, "acc5": None if result is None else result.acc5,
                "input": {"name": INPUT, "shape": ["batch", *input_size], "dtype": "float32", "preprocessing": preprocessing},
                "output": {"name": OUTPUT, "shape": ["batch", int(net.anchors[-1].num_classes)], "dtype": "float32"},
                "class_names": None if class_names is None else list(class_names),
                "check": check.__dict__, "exporter": f"torch {torch.__version__} torch.onnx.export(dynamo=True)",
            }
            (tmp / json_name).write_text(json.dumps(meta, indent=1))
            written.append(Path(out_dir) / onnx_name)
    return written


def read_exports(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON of every ONNX file in ``folder`` (by stitch id), each checked to have its ONNX file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"ONNX folder not found: {folder} (write one with `snnet export --format onnx`)")
    metas = []
    for path in sorted(folder.glob("stitch-*.json")):
        meta = read_json(path)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise BadFileError(f"{path}: not an snnet ONNX description (format {FORMAT!r})")
        missing = [key for key in DESCRIPTION_KEYS if key not in meta]
        if missing:
            raise BadFileError(f"{path}: an snnet ONNX description without {', '.join(missing)}: "
                               "write it again with `snnet export --format onnx`")
        if not (folder / meta["file"]).is_file():
            raise BadFileError(f"{path} describes {folder / meta['file']}, which is missing")
        metas.append(meta)
    if not metas:
        raise BadFileError(f"{folder}: no stitch-*.json files: is it a folder written by `snnet export --format onnx`?")
    return sorted(metas, key=lambda m: m["id"])


def onnx_results(folder: str | os.PathLike, results: Sequence[StitchResult] | None = None) -> list[StitchResult]:
    """The exported stitches as results rows: from ``results`` where given (same id and name, else an
    error), else the costs and accuracies their JSON recorded at export."""
    metas = read_exports(folder)
    if results is None:
        return [StitchResult.from_dict(m) for m in metas]
    by_id = {r.id: r for r in results}
    for m in metas:
        if m["id"] not in by_id or by_id[m["id"]].name != m["name"]:
            raise ValueError(f"{Path(folder) / file_names(m['id'])[1]}: stitch {m['id']} {m['name']!r} is not in the given "
                             "results: they describe another network")
    return [by_id[m["id"]] for m in metas]


def onnx_latency(
    folder: str | os.PathLike, batch_size: int = 1, warmup: int = 5, repeats: int = 20, threads: int | None = None,
    progress: bool = True,
) -> dict[int, float]:
    """Median ONNX Runtime latency (ms, CPU) of every exported stitch in ``folder`` on a random float32 batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    folder = Path(folder)
    out = {}
    for meta in tqdm(read_exports(folder), desc=f"ONNX Runtime latency (batch {batch_size})", disable=not progress):
        runner = session(folder / meta["file"], threads)
        described, takes = list(meta["input"]["shape"][1:]), list(runner.get_inputs()[0].shape[1:])
        if described != takes:
            raise OnnxCheckError(f"{folder / meta['file']} takes images of shape {takes}, but the JSON that describes it "
                                 f"says {described}: the two files are of different exports")
        run = runner.run
        x = torch.randn(batch_size, *described)
        out[meta["id"]] = median_ms(lambda t, run=run: run([OUTPUT], {INPUT: t.numpy()}), x, warmup, repeats)
    return out

"""Checkpoint files: one clear line for a file that cannot be used (without importing Lightning:
``snnet serve`` and ``export`` read checkpoints too; the writer is :mod:`snnet.checkpoint_write`).

:func:`read_checkpoint` is the one reader of every entry point (fit/validate ``--ckpt_path``,
``export``, ``bench latency``): truncated files, random bytes and non-Lightning files raise
:class:`CheckpointError` naming the file, what is wrong and the newest complete checkpoint beside it.
"""
from __future__ import annotations

import importlib
import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from snnet.errors import BadFileError
from snnet.moved import moved_attribute

PARTIAL = ".partial"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


class CheckpointError(BadFileError):
    """A checkpoint file that cannot be used; the message names it and says why."""


def is_complete(path: str | os.PathLike) -> bool:
    """A whole torch.save archive (its zip directory, written last, is there), without loading it."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def newest_complete_beside(path: str | os.PathLike) -> Path | None:
    """The most recently written complete ``*.ckpt`` in ``path``'s folder other than ``path``."""
    path = Path(path)
    others = [p for p in path.parent.glob("*.ckpt") if p.resolve() != path.resolve() and p.is_file()]
    for other in sorted(others, key=lambda p: p.stat().st_mtime, reverse=True):
        if is_complete(other):
            return other
    return None


def _why_unreadable(path: Path, error: Exception) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "the file is empty (a write that never finished?)"
    if head != ZIP_MAGIC:
        return "not a PyTorch checkpoint (it does not start like a torch.save archive)"
    if not is_complete(path):
        return "truncated: the archive ends before its directory (a write that was cut off?)"
    return f"unreadable ({type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else 'no message'})"


def unusable(path: str | os.PathLike, reason: str) -> CheckpointError:
    """The error for checkpoint ``path``, with the newest complete checkpoint beside it as a way out."""
    other = newest_complete_beside(path)
    hint = (f"; the newest complete checkpoint beside it is {other} (resume with --ckpt_path {other})" if other
            else "; no complete checkpoint beside it")
    return CheckpointError(f"checkpoint {path}: {reason}{hint}")


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool | None = True,
                    load: Callable[..., Any] = torch.load) -> dict[str, Any]:
    """``load`` (torch.load) of a Lightning checkpoint, or a :class:`CheckpointError` that says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... depending on the damage
        raise unusable(path, _why_unreadable(path, e)) from e
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise unusable(path, "a torch file but not a Lightning checkpoint (no state_dict)")
    return checkpoint


def state_mismatch(expected: dict[str, Tensor], found: dict[str, Tensor], limit: int = 3) -> str | None:
    """One line on how ``found`` differs from ``expected`` (missing, unexpected, other shapes), or None.
    A missing BatchNorm ``num_batches_tracked`` is no mismatch: files saved before torch kept it (the
    pretrained CIFAR ResNets) load strictly, BatchNorm filling it in."""
    missing = [k for k in expected if k not in found and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in found and hasattr(found[k], "shape") and tuple(found[k].shape) != tuple(v.shape)]
    parts = [f"{len(items)} {what} (e.g. {', '.join(items[:limit])})"
             for what, items in (("missing weights", missing), ("unexpected weights", unexpected), ("other shapes", shapes)) if items]
    return "; ".join(parts) or None


# the network config keys that define the network's structure (not where its weights come from)
NETWORK_KEYS: tuple[str, ...] = ("anchors", "model_kwargs", "kernel_size", "stride", "nearest", "stitch_stages",
                                 "input_size", "two_way", "stitch_lora_rank")
WEIGHT_SOURCES = ("checkpoint", "pretrained")  # per-anchor mapping entries that only say where weights come from


def _plain(value: Any) -> Any:
    """Tuples as lists and anchor mappings without their weight source, to compare a YAML config with saved hyper-parameters."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in WEIGHT_SOURCES}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _resolve(class_path: str) -> object:
    """The class a path names (old paths redirect to the same class), or the path where it does not import."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path


def network_mismatch(config: dict[str, Any], hparams: dict[str, Any]) -> str | None:
    """How the checkpoint's hyper-parameters describe another network than a model config
    (``class_path`` plus init args), or None: another module class, other anchors or stitch space."""
    saved_class, config_class = hparams.get("_class_path"), config.get("class_path")
    if saved_class and config_class and _resolve(saved_class) is not _resolve(config_class):
        return f"its model is {saved_class}, the config's {config_class}"
    ours, theirs = config.get("network"), hparams.get("network")
    if not isinstance(ours, dict) or not isinstance(theirs, dict):
        return None
    for key in NETWORK_KEYS:
        if key in ours and key in theirs and _plain(ours[key]) != _plain(theirs[key]):
            return f"network.{key} is {_plain(theirs[key])} in the checkpoint, {_plain(ours[key])} in the config"
    return None


def check_fits(module: torch.nn.Module, checkpoint: dict[str, Any], path: str | os.PathLike | None) -> None:
    """A :class:`CheckpointError` if the checkpoint's weights are not those of ``module``'s architecture."""
    mismatch = state_mismatch(module.state_dict(), checkpoint.get("state_dict", {}))
    if mismatch:
        raise CheckpointError(f"checkpoint {path}: written for another architecture than the config's ({mismatch})")


def load_anchor_weights(model: torch.nn.Module, path: str | os.PathLike, name: str, use_ema: bool = False) -> torch.nn.Module:
    """Load an anchor's weight file (.safetensors or torch; ``state_dict``/``model`` wrappers unwrapped,
    EMA weights preferred with ``use_ema`` as timm does) into ``model``; a file that is unreadable or
    does not fit raises :class:`CheckpointError` naming the file, the anchor and the first mismatched tensors."""
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint for anchor {name!r} not found: {path}")
    try:
        state = load_state_dict(str(path), use_ema=use_ema)
    except Exception as e:  # safetensors, pickle and zip errors differ by the damage
        message = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
        raise CheckpointError(f"checkpoint {path} of anchor {name!r}: unreadable ({type(e).__name__}: {message})") from e
    mismatch = state_mismatch(model.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"checkpoint {path} does not fit anchor {name!r}: {mismatch}")
    model.load_state_dict(state, strict=True)
    return model


def __getattr__(name: str) -> Any:
    return moved_attribute(__name__, name)  # AtomicCheckpointIO moved to snnet.checkpoint_write

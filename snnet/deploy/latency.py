"""Latency of every stitch on the current device, so budgets can be set in milliseconds.

FLOPs rank stitches but do not predict wall time across devices (memory-bound blocks, kernel
launches, fused attention), so ``snnet select --max-latency-ms`` needs latencies measured where the
model will run: the median of ``repeats`` timed forwards after ``warmup`` untimed ones.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from snnet.results import StitchResult
from snnet.sn_net.network import StitchableNetwork

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {tuple(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | torch.device) -> torch.device:
    """A usable device, or a clear error naming it (a typo, or CUDA asked for where there is none)."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {str(name)!r}: use cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(name)!r} is not available here: torch sees no CUDA GPU; use --device cpu")
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def median_ms(
    fn: Callable[[Tensor], Tensor], x: Tensor, warmup: int = 5, repeats: int = 20, clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median time of ``fn(x)`` in milliseconds (device synchronised around every call).

    ``clock``: wall time by default (latency); ``time.process_time`` gives this process's CPU time,
    which other jobs on a shared CPU hardly inflate (CPU-only, single-threaded comparisons).
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    for _ in range(warmup):
        fn(x)
    _sync(x.device)
    times = []
    for _ in range(repeats):
        start = clock()
        fn(x)
        _sync(x.device)
        times.append(clock() - start)
    return statistics.median(times) * 1e3


def measure_latency(
    net: StitchableNetwork,
    ids: Sequence[int] | None = None,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    warmup: int = 5,
    repeats: int = 20,
    progress: bool = True,
) -> dict[int, float]:
    """Median forward latency (ms) of each stitch on a random ``(batch_size, *input_size)`` batch
    (a language model: ``batch_size`` sequences of ``input_size[0]`` token ids).

    The network is moved to ``device`` and cast to ``dtype`` in place (as ``nn.Module.to``) and left
    in eval mode: latency is measured on the model as it will be deployed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = resolve_device(device)
    ids = list(range(net.num_configs)) if ids is None else [net.check_id(i) for i in ids]
    net.to(device=device, dtype=dtype).eval()
    x = net.example_input(batch_size, dtype, device)
    return {
        stitch: median_ms(lambda batch, s=stitch: net(batch, s), x, warmup, repeats)
        for stitch in tqdm(ids, desc=f"latency on {device} (batch {batch_size}, {dtype})", disable=not progress)
    }


def with_latency(results: Sequence[StitchResult], latency_ms: dict[int, float]) -> list[StitchResult]:
    """``results`` with ``latency_ms`` filled in from the measurement (every id must have one)."""
    missing = sorted(r.id for r in results if r.id not in latency_ms)
    if missing:
        raise ValueError(f"no latency measured for stitch ids {missing}")
    return [dataclasses.replace(r, latency_ms=latency_ms[r.id]) for r in results]

"""Start-up: check the files, measure what the policy needs, build the server, run it until a signal.

Everything that can make a start fail (a missing or corrupt checkpoint or results file, results of
another network, a stitch id out of range) fails here, in the main process, with the file or value
named, before any worker starts.
"""
from __future__ import annotations

import math
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from snnet.deploy.latency import measure_latency, resolve_device
from snnet.results import check_budgets
from snnet.serve.policy import FixedPolicy, LatencyTable, Policy, SLOPolicy
from snnet.sn_net.network import StitchableNetwork

POLICIES: tuple[str, ...] = ("slo", "fixed")
LATENCY_SOURCES: tuple[str, ...] = ("measure", "results")
MIN_PORT = 1024  # LitServe refuses lower ports (after start-up: checked here first)


@dataclass
class ServeConfig:
    """``snnet serve`` options (see ``snnet serve --help`` for what each does)."""

    ckpt: str
    results: str | None = None  # None: the results a pretrained folder holds
    host: str = "127.0.0.1"
    port: int = 8000
    policy: Literal["slo", "fixed"] = "slo"
    slo_ms: float = 20.0
    margin: float = 0.8
    stitch: int | None = None
    latency: Literal["measure", "results"] = "measure"
    device: str = "auto"
    max_batch_size: int = 16
    batch_timeout_ms: float = 2.0
    top_k: int = 5
    api_key: str | None = None
    max_image_pixels: int = 4096 * 4096
    max_payload_mb: float = 16.0
    metric: str = "acc1"
    log_level: str = "warning"
    fast_queue: bool = True  # LitServe's ZeroMQ transport: fewer process hops per request than its manager queues
    max_new_tokens: int = 64  # a language model's default max_tokens per request
    tokenizer: str | None = None  # a language model's tokenizer: None: the one it was trained with, else bytes

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {POLICIES}")
        if self.latency not in LATENCY_SOURCES:
            raise ValueError(f"unknown latency source {self.latency!r}; choose one of {LATENCY_SOURCES}")
        if self.policy == "fixed" and self.stitch is None:
            raise ValueError("--policy fixed needs --stitch ID (the stitch to serve)")
        if self.policy == "slo" and self.stitch is not None:
            raise ValueError(f"--stitch {self.stitch} is for --policy fixed; the slo policy chooses the stitch itself")
        for name in ("max_batch_size", "top_k", "max_image_pixels", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_budgets({"slo_ms": self.slo_ms, "max_payload_mb": self.max_payload_mb})  # finite, > 0 (not NaN, not inf)
        if not 0 <= self.batch_timeout_ms < math.inf:
            raise ValueError(f"batch_timeout_ms must be a finite number >= 0, got {self.batch_timeout_ms}")
        if not 0 < self.margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {self.margin}")


def read_checkpoint(path: str | Path) -> tuple[StitchableNetwork, list[str] | None]:
    """The trained network (checkpoint, pretrained folder or repo id) and its class names (None where it had none)."""
    from snnet.deploy.pretrained import load_trained

    trained = load_trained(path)  # errors name the file (snnet.errors.BadFileError)
    return trained.net, trained.class_names


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, and ``max_batch``: the sizes the latency table holds."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def measure_table(net: StitchableNetwork, ids: list[int], sizes: tuple[int, ...], device: str) -> LatencyTable:
    """Median forward latency of each stitch at each batch size, on the serving device."""
    per_size = [measure_latency(net, ids, b, device=device, warmup=2, repeats=7, progress=False) for b in sizes]
    return LatencyTable(sizes, {s: tuple(m[s] for m in per_size) for s in ids})


def eval_transform(net: StitchableNetwork):
    """The validation transform of ``snnet validate`` (the datamodules' own, from the data config)."""
    from snnet.transforms import eval_transform as of_config

    return of_config(net.data_config())


def build_server(cfg: ServeConfig):
    """Check the files, measure the latencies, and return the LitServer (not yet running) and its state."""
    from snnet.deploy.latency import with_latency
    from snnet.deploy.pretrained import load_trained, results_of
    from snnet.serve.api import ServeState, StitchAPI, StitchServer
    from snnet.serve.request import Catalog
    from snnet.serve.stats import ServeStats
    from snnet.sn_net.choice import check_results_match

    trained = load_trained(cfg.ckpt)  # errors name the file (snnet.errors.BadFileError)
    net, class_names = trained.net, trained.class_names
    results = results_of(cfg.results) if cfg.results is not None else trained.results  # errors name the file
    if results is None:
        raise ValueError(f"{cfg.ckpt} is a checkpoint: give --results (a results JSON written by snnet validate or fit)")
    try:
        check_results_match(net, results)
    except (ValueError, IndexError) as e:
        raise ValueError(f"results file {cfg.results or trained.local} does not describe checkpoint {cfg.ckpt}: {e}") from None
    if cfg.stitch is not None:
        net.check_id(cfg.stitch)
    language_model = net.is_language_model
    metric = "ppl" if language_model else cfg.metric
    if cfg.policy == "slo" and any(getattr(r, metric) is None for r in results):
        raise ValueError(f"--policy slo needs {metric} for every stitch in {cfg.results}: write it with `snnet validate`")
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device)
    device = str(resolve_device(device))
    if language_model:
        from snnet.serve.text_api import build_text_server

        tokenizer = cfg.tokenizer or (trained.training.get("data") or {}).get("tokenizer") or "bytes"
        return build_text_server(cfg, net, str(trained.local.resolve()), results, device, tokenizer)
    sizes = batch_sizes(cfg.max_batch_size)
    ids = [r.id for r in results]
    if cfg.latency == "results":
        table = LatencyTable.from_results(results, sizes)
    else:
        table = measure_table(net, ids, sizes, device)
    # a request's max_latency_ms resolves on the file's latencies where it has them (as `snnet select`),
    # else on the batch-1 latencies measured here
    results = [r if r.latency_ms is not None else with_latency([r], {r.id: table.batch_ms(r.id, 1)})[0] for r in results]
    num_classes = int(getattr(net.anchors[-1], "num_classes"))
    if class_names is not None and len(class_names) != num_classes:
        class_names = None
    policy: Policy = (FixedPolicy(cfg.stitch) if cfg.policy == "fixed"
                      else SLOPolicy(results, table, cfg.slo_ms, cfg.margin, metric=cfg.metric))
    state = ServeState(
        catalog=Catalog(net.table(), results, num_classes, class_names, cfg.metric), transform=eval_transform(net),
        policy=policy, stats=ServeStats(slo_ms=cfg.slo_ms if cfg.policy == "slo" else None), top_k=min(cfg.top_k, num_classes),
        max_pixels=cfg.max_image_pixels, max_payload_bytes=int(cfg.max_payload_mb * 2**20),
    )
    del net
    api = StitchAPI(str(trained.local.resolve()), cfg.max_batch_size, cfg.batch_timeout_ms / 1e3, cfg.api_key)
    server = StitchServer(
        api, state, accelerator=torch.device(device).type, devices=1, timeout=30,
        max_payload_size=state.max_payload_bytes, disable_openapi_url=True, fast_queue=cfg.fast_queue,
    )
    return server, state


def check_port(host: str, port: int) -> None:
    """A ValueError naming host, port and the OS error when the server could not listen there
    (checked before start-up, so the banner is never printed for a port that is taken)."""
    if not MIN_PORT <= port <= 65535:
        raise ValueError(f"--port must be in {MIN_PORT}..65535 (LitServe's range), got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server on it? choose another --port)") from None


def serve(cfg: ServeConfig) -> None:
    """Run until SIGINT or SIGTERM; either stops new connections and finishes the in-flight requests."""
    check_port(cfg.host, cfg.port)
    server, state = build_server(cfg)
    main_pid = os.getpid()

    def stop(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:  # the HTTP process (forked) re-raises it once drained: just exit
            raise SystemExit(0)
        raise KeyboardInterrupt  # SIGTERM takes LitServe's Ctrl+C path: drain the HTTP process, then stop

    signal.signal(signal.SIGTERM, stop)
    policy = state.policy.describe()
    print(f"snnet serve: {len(state.catalog.infos)} stitches of {cfg.ckpt} on http://{cfg.host}:{cfg.port} "
          f"(policy {policy}); Ctrl+C to stop", flush=True)
    server.run(host=cfg.host, port=cfg.port, log_level=cfg.log_level, generate_client_file=False, num_api_servers=1)
    print("snnet serve: stopped", flush=True)


"""The project's own subcommands: thin command lines over library functions.

Each parses with :func:`snnet.arguments.new_parser` (jsonargparse, as LightningCLI) and raises
its errors to ``snnet.cli.main``, the one place that prints them.
"""
from __future__ import annotations

import json
import os
from argparse import RawDescriptionHelpFormatter
from typing import Any, Callable, Sequence

import yaml
from jsonargparse import ArgumentParser

from snnet.arguments import new_parser, parse, unknown_key_line
from snnet.errors import UsageError

def network_section(path: str | os.PathLike) -> dict[str, Any]:
    """The ``network`` mapping of a fit config (``model.init_args.network``) or a bare one."""
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    for keys in (("model", "init_args", "network"), ("model", "network"), ("network",)):
        node: Any = cfg
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            return dict(node)
    raise ValueError(f"{path}: no network section (looked for model.init_args.network, model.network, network)")


def network_config(section: dict[str, Any], source: str = "network"):
    """A :class:`NetworkConfig` from a mapping; an unknown key names the valid ones and the closest."""
    from dataclasses import fields

    from snnet.sn_net.build import NetworkConfig

    names = [f.name for f in fields(NetworkConfig)]
    unknown = sorted(set(section) - set(names))
    if unknown:
        raise UsageError(f"{source}: " + unknown_key_line(unknown[0], names))
    return NetworkConfig(**section)


def stitches_command(argv: Sequence[str]) -> None:
    from snnet.front import stitch_result
    from snnet.results import print_table, save_results
    from snnet.sn_net.build import build_network

    parser = new_parser("snnet stitches", "List every configuration with FLOPs and parameters, without training.")
    parser.add_argument("--config", type=str, help="YAML fit config whose model network section to use")
    parser.add_argument("--anchors", type=str, nargs="+", help="timm model names, any order (sorted fast-to-slow by FLOPs)")
    parser.add_argument("--pretrained", type=bool | None, help="load hub weights (true/false)")
    parser.add_argument("--checkpoints", type=str, nargs="+", help="one local checkpoint per anchor")
    parser.add_argument("--kernel-size", type=int | None)
    parser.add_argument("--stride", type=int | None)
    parser.add_argument("--nearest", type=bool | None, help="stitch adjacent anchors only (true/false)")
    parser.add_argument("--stitch-stages", type=int, nargs="+", help="stages where stitching is allowed")
    parser.add_argument("--two-way", type=bool | None, help="SN-Netv2's space: both directions and two-hop routes (true/false)")
    parser.add_argument("--stitch-lora-rank", type=int | None, help="LoRA stitching layers of this rank (0: plain)")
    parser.add_argument("--input-size", type=int, nargs="+", help="C H W, or T (tokens) for language models")
    parser.add_argument("--num-classes", type=int | None)
    parser.add_argument("--json", type=str, help="write the table as a JSON list here")
    args = parse(parser, argv)

    section = network_section(args.config) if args.config else {}
    overrides = {
        "anchors": args.anchors, "pretrained": args.pretrained, "checkpoints": args.checkpoints,
        "kernel_size": args.kernel_size, "stride": args.stride, "nearest": args.nearest,
        "stitch_stages": args.stitch_stages, "two_way": args.two_way, "stitch_lora_rank": args.stitch_lora_rank,
        "input_size": tuple(args.input_size) if args.input_size else None,
    }
    section.update({k: v for k, v in overrides.items() if v is not None})
    if args.num_classes is not None:
        section.setdefault("model_kwargs", {})["num_classes"] = args.num_classes
    if "anchors" not in section:
        raise UsageError("give --anchors or a --config with a network section")
    net = build_network(network_config(section, f"{args.config} network" if args.config else "network"))
    rows = [stitch_result(net, i.id) for i in net.table()]
    print_table(rows)
    if args.json:
        save_results(rows, args.json)
        print(f"wrote {len(rows)} configurations to {args.json}")


def add_budget_arguments(parser: ArgumentParser) -> None:
    from snnet.results import METRICS

    parser.add_argument("--max-gflops", type=float | None, help="FLOPs budget in GFLOPs (a positive number)")
    parser.add_argument("--max-params", type=float | None, help="parameter count, e.g. 5e6")
    parser.add_argument("--max-latency-ms", type=float | None, help="needs latency_ms in the results (snnet bench latency)")
    parser.add_argument("--metric", default="acc1", choices=list(METRICS), help="ppl/loss: lower is better (language models)")


def select_command(argv: Sequence[str]) -> None:
    from snnet.results import load_results, select_stitch

    parser = new_parser("snnet select", "The most accurate measured stitch within a budget.")
    parser.add_argument("--results", type=str, required=True, help="results JSON written by snnet validate")
    add_budget_arguments(parser)
    args = parse(parser, argv)
    best = select_stitch(load_results(args.results), max_gflops=args.max_gflops, max_params=args.max_params,
                         max_latency_ms=args.max_latency_ms, metric=args.metric)
    print(json.dumps(best.to_dict()))


def similarity_command(argv: Sequence[str]) -> None:
    from snnet.general_stitching.similarity import parse_similarity, run_similarity

    config, data = parse_similarity(argv)
    written = run_similarity(config, data)
    print("\n".join(["wrote:", *(f"  {path}" for path in written)]))


def bench_latency_command(argv: Sequence[str]) -> None:
    from snnet.deploy.latency import DTYPES, measure_latency, parse_dtype, with_latency
    from snnet.deploy.load import load_network
    from snnet.results import load_figures, load_results, print_table, save_results
    from snnet.sn_net.build import build_network
    from snnet.sn_net.choice import check_results_match

    parser = new_parser(
        "snnet bench latency",
        "Measure every stitch's forward latency (median ms) on this device and write it into a results "
        "file, for snnet select --max-latency-ms.",
    )
    parser.add_argument("--results", type=str, required=True, help="results JSON (snnet validate or snnet stitches --json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=str, help="fit config whose network to time (built without weights: they do not change latency)")
    source.add_argument("--ckpt", type=str, help="snnet fit checkpoint: time the trained network")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forwards per stitch")
    parser.add_argument("--repeats", type=int, default=20, help="timed forwards per stitch (the median is kept)")
    parser.add_argument("--out", type=str, help="write the results here (default: update --results in place)")
    args = parse(parser, argv)
    for name, low in (("batch_size", 1), ("repeats", 1), ("warmup", 0)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    results = load_results(args.results)
    if args.ckpt is not None:
        net, _ = load_network(args.ckpt)
    else:
        net = build_network(network_config(network_section(args.config), f"{args.config} network").without_weights())
    check_results_match(net, results)
    latency = measure_latency(net, [r.id for r in results], args.batch_size, parse_dtype(args.dtype), args.device,
                              args.warmup, args.repeats)
    results = with_latency(results, latency)
    out = args.out or args.results
    save_results(results, out, figures=load_figures(args.results))  # latency added, the figures kept
    print_table(results, title=f"latency on {args.device}, batch {args.batch_size}, {args.dtype}")
    print(f"wrote latency_ms of {len(results)} stitches to {out}")


BENCH_COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "latency": (bench_latency_command, "Median forward latency of every stitch on this device, written into a results file."),
}


def bench_command(argv: Sequence[str]) -> None:
    """``snnet bench <what>``: measurements on the current device (one subcommand per quantity)."""
    lines = ["usage: snnet bench <what> [options]", "", "what:", *(f"  {n:<9} {doc}" for n, (_, doc) in BENCH_COMMANDS.items())]
    if not argv or argv[0] in ("-h", "--help"):
        print("\n".join(lines))
        return
    if argv[0] not in BENCH_COMMANDS:
        raise UsageError(f"unknown measurement {argv[0]!r}; choose one of: {', '.join(BENCH_COMMANDS)}")
    BENCH_COMMANDS[argv[0]][0](argv[1:])


def export_command(argv: Sequence[str]) -> None:
    from snnet.deploy.export import export_stitch
    from snnet.deploy.load import load_network
    from snnet.errors import writable_folder
    from snnet.sn_net.choice import StitchChoice

    parser = new_parser(
        "snnet export",
        "Write one stitch of a trained network as a standalone model: only the weights its path uses "
        "(model.safetensors), a recipe to rebuild it without the other anchors (stitch.json) and a "
        "torch.export program (program.pt2).",
    )
    parser.add_argument("--ckpt", type=str, required=True, help="snnet fit checkpoint")
    parser.add_argument("--stitch", type=int | None, help="configuration id (snnet stitches lists them)")
    add_budget_arguments(parser)
    parser.add_argument("--results", type=str, help="results JSON with accuracies (snnet validate), to choose by budget")
    parser.add_argument("--out", type=str, required=True, help="output folder (created; its files are replaced)")
    args = parse(parser, argv)
    choice = StitchChoice(args.stitch, args.max_gflops, args.max_params, args.max_latency_ms, args.results, args.metric)
    if choice.stitch is None and not choice.has_budget:
        raise UsageError("give --stitch ID, or a budget (--max-gflops, --max-params, --max-latency-ms) with --results")
    writable_folder(args.out, "--out")  # before any work: a bad --out fails at once
    net, config = load_network(args.ckpt)
    stitch = choice.resolve(net)
    out = export_stitch(net, stitch, args.out, config.model_kwargs)
    info = net.infos[stitch]
    print(f"exported stitch {info.id} ({info.name}, {info.flops / 1e9:.4g} GFLOPs, {info.params} parameters) to {out}")


SERVE_HELP = """\
Serve every stitch of one trained network over HTTP (LitServe): POST /predict with an image (JSON
{"image": "<base64>"} or a multipart upload 'image') and optionally "stitch": ID or a budget
("max_gflops", "max_params", "max_latency_ms", resolved as `snnet select` does); GET / is a page
with the Pareto plot, a budget slider and an upload; GET /stats, /stitches, /health.

A request that names no stitch is answered by the policy:
  slo    (default) the most accurate stitch on the latency/accuracy front whose expected latency
         meets --slo-ms x --margin at the number of requests in flight when it arrives. The
         expected latency drains that queue in batches of --max-batch-size with each stitch's
         forward latency per batch size (measured at start-up, or --latency results), plus an
         overhead a + b x depth fitted to the latencies observed. Under load it moves to cheaper
         stitches, back when the load falls; when none fits, the fastest answers.
  fixed  always --stitch ID (a baseline).
"""

def serve_command(argv: Sequence[str]) -> None:
    from snnet.serve.launch import ServeConfig, serve

    parser = new_parser("snnet serve", SERVE_HELP, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=str, required=True, help="snnet fit checkpoint (e.g. outputs/quickstart/**/last.ckpt)")
    parser.add_argument("--results", type=str, required=True, help="results JSON with every stitch's accuracy (snnet validate/fit)")
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--policy", default="slo", choices=["slo", "fixed"], help="who chooses when a request does not (above)")
    parser.add_argument("--slo-ms", type=float, default=20.0, help="latency target of --policy slo (ms, server side)")
    parser.add_argument("--margin", type=float, default=0.8, help="slo: aim the expected latency at this fraction of --slo-ms")
    parser.add_argument("--stitch", type=int | None, help="--policy fixed: the stitch id to serve")
    parser.add_argument("--latency", default="measure", choices=["measure", "results"],
                        help="slo: time every stitch per batch size at start-up, or take the results' latency_ms (snnet bench latency)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-batch-size", type=int, default=16, help="dynamic batching: at most this many requests per forward")
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0, help="dynamic batching: wait this long to fill a batch")
    parser.add_argument("--top-k", type=int, default=5, help="classes per answer unless a request sets top_k")
    parser.add_argument("--api-key", type=str | None, help="require this X-API-Key header (LitServe's API key; default $LIT_SERVER_API_KEY)")
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="refuse larger images (413)")
    parser.add_argument("--max-payload-mb", type=float, default=16.0, help="refuse larger request bodies (413)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    options = parse(parser, argv).as_dict()
    options["api_key"] = options["api_key"] or os.environ.get("LIT_SERVER_API_KEY")
    serve(ServeConfig(**options))


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "stitches": (stitches_command, "List the configurations of a family (id, name, FLOPs, params) without training."),
    "select": (select_command, "Pick the most accurate stitch for a FLOPs, parameter or latency budget."),
    "bench": (bench_command, "Measure on this device: `snnet bench latency` times every stitch for latency budgets."),
    "export": (export_command, "Write one stitch (id or budget) as a standalone model: its weights only, a recipe, a torch.export program."),
    "similarity": (similarity_command, "CKA and stitched-accuracy matrices between the layers of two models (heatmaps, JSON/CSV)."),
    "serve": (serve_command, "Serve every stitch over HTTP (LitServe): per-request stitch or budget, load-adaptive SLO policy, a page."),
}

"""The project's own subcommands: thin command lines over library functions.

Each parses with :func:`snnet.arguments.new_parser` (jsonargparse, as LightningCLI) and raises
its errors to ``snnet.cli.main``, the one place that prints them.
"""
from __future__ import annotations

import json
import os
from argparse import RawDescriptionHelpFormatter
from pathlib import Path
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
    from snnet.deploy.pretrained import results_of
    from snnet.results import select_stitch

    parser = new_parser("snnet select", "The most accurate measured stitch within a budget.")
    parser.add_argument("--results", type=str, required=True,
                        help="results JSON written by snnet validate, or a pretrained folder / Hub repo id (its results.json)")
    add_budget_arguments(parser)
    args = parse(parser, argv)
    best = select_stitch(results_of(args.results), max_gflops=args.max_gflops, max_params=args.max_params,
                         max_latency_ms=args.max_latency_ms, metric=args.metric)
    print(json.dumps(best.to_dict()))


def similarity_command(argv: Sequence[str]) -> None:
    from snnet.general_stitching.similarity import parse_similarity, run_similarity

    config, data = parse_similarity(argv)
    written = run_similarity(config, data)
    print("\n".join(["wrote:", *(f"  {path}" for path in written)]))


def bench_latency_command(argv: Sequence[str]) -> None:
    from snnet.deploy.latency import DTYPES, measure_latency, parse_dtype, with_latency
    from snnet.deploy.onnx import onnx_latency, onnx_results
    from snnet.deploy.pretrained import load_trained, results_of
    from snnet.results import load_figures, print_table, save_results
    from snnet.sn_net.build import build_network
    from snnet.sn_net.choice import check_results_match

    parser = new_parser(
        "snnet bench latency",
        "Measure every stitch's forward latency (median ms) on this device and write it into a results "
        "file, for snnet select --max-latency-ms.",
    )
    parser.add_argument("--results", type=str, help="results JSON (snnet validate or snnet stitches --json) or a pretrained "
                        "folder; --runtime onnxruntime: optional (default: the costs and accuracies in the ONNX files' JSON)")
    parser.add_argument("--runtime", default="pytorch", choices=["pytorch", "onnxruntime"],
                        help="onnxruntime: time the ONNX files of --onnx on this CPU instead of the PyTorch network")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=str, help="fit config whose network to time (built without weights: they do not change latency)")
    source.add_argument("--ckpt", type=str, help="snnet fit checkpoint, pretrained folder or Hub repo id: time the trained network")
    source.add_argument("--onnx", type=str, help="--runtime onnxruntime: a folder written by snnet export --format onnx")
    parser.add_argument("--threads", type=int | None, help="--runtime onnxruntime: intra-op threads (default: ONNX Runtime's)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forwards per stitch")
    parser.add_argument("--repeats", type=int, default=20, help="timed forwards per stitch (the median is kept)")
    parser.add_argument("--out", type=str, help="write the results here (default: update --results in place; "
                        "--runtime onnxruntime: the exported stitches' rows to ONNX_DIR/results.json)")
    args = parse(parser, argv)
    for name, low in (("batch_size", 1), ("repeats", 1), ("warmup", 0)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    onnx = args.runtime == "onnxruntime"
    if onnx != (args.onnx is not None) or (not onnx and (args.results is None or (args.config or args.ckpt) is None)):
        raise UsageError("give --results and one of --config, --ckpt; or --runtime onnxruntime --onnx DIR")
    if onnx and (args.dtype, args.device) != ("float32", "cpu"):
        raise UsageError(f"--dtype {args.dtype} --device {args.device}: --runtime onnxruntime times the exported float32 "
                         "files on the CPU; --dtype and --device are for --runtime pytorch")
    if args.threads is not None and (not onnx or args.threads < 1):
        raise UsageError(f"--threads {args.threads}: " + ("must be >= 1" if onnx else "is for --runtime onnxruntime "
                         "(PyTorch's threads: set OMP_NUM_THREADS)"))
    if not onnx and args.out is None and not Path(args.results).is_file():
        raise UsageError(f"--results {args.results} is no file to update in place (a pretrained folder is never changed): give --out")
    if onnx:
        results = onnx_results(args.onnx, None if args.results is None else results_of(args.results))
        latency = onnx_latency(args.onnx, args.batch_size, args.warmup, args.repeats, args.threads)
    else:
        results = results_of(args.results)
        if args.ckpt is not None:
            net = load_trained(args.ckpt).net
        else:
            net = build_network(network_config(network_section(args.config), f"{args.config} network").without_weights())
        check_results_match(net, results)
        latency = measure_latency(net, [r.id for r in results], args.batch_size, parse_dtype(args.dtype), args.device,
                                  args.warmup, args.repeats)
    results = with_latency(results, latency)
    out = args.out or (str(Path(args.onnx) / "results.json") if onnx else args.results)
    figures = None if onnx or not Path(args.results).is_file() else load_figures(args.results)
    save_results(results, out, figures=figures)  # latency added, the figures kept
    where = "ONNX Runtime on cpu" if onnx else args.device
    print_table(results, title=f"latency on {where}, batch {args.batch_size}, {'float32' if onnx else args.dtype}")
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
    from snnet.deploy.onnx import export_onnx
    from snnet.deploy.pretrained import check_repo_id, load_trained, push_to_hub, results_of, save_pretrained
    from snnet.deploy.staging import check_free
    from snnet.errors import writable_folder
    from snnet.results import pareto_front
    from snnet.sn_net.choice import StitchChoice, check_results_match

    parser = new_parser(
        "snnet export",
        "Write one stitch of a trained network as a standalone model: only the weights its path uses "
        "(model.safetensors), a recipe to rebuild it without the other anchors (stitch.json) and a "
        "torch.export program (program.pt2); --format onnx: ONNX files checked by ONNX Runtime "
        "(one stitch, or --front); --format pretrained: the whole network as a Hub-style folder.",
    )
    parser.add_argument("--ckpt", type=str, required=True, help="snnet fit checkpoint, pretrained folder or Hub repo id")
    parser.add_argument("--format", default="torch", choices=["torch", "onnx", "pretrained"],
                        help="torch (safetensors + torch.export), onnx, or pretrained (every stitch: weights, config.json, "
                             "results, model card)")
    parser.add_argument("--stitch", type=int | None, help="configuration id (snnet stitches lists them)")
    parser.add_argument("--front", action="store_true", help="--format onnx: every stitch on the measured Pareto front (needs results)")
    add_budget_arguments(parser)
    parser.add_argument("--results", type=str, help="results JSON with accuracies (snnet validate), to choose by budget "
                        "(default: a pretrained folder's own)")
    parser.add_argument("--push-to-hub", type=str | None, help="--format pretrained: then upload the folder to this Hub repo id")
    parser.add_argument("--out", type=str, required=True,
                        help="output folder (torch: created, its files are replaced; onnx, pretrained: a new or empty one)")
    args = parse(parser, argv)
    choice = StitchChoice(args.stitch, args.max_gflops, args.max_params, args.max_latency_ms, args.results, args.metric)
    whole = args.format == "pretrained" or args.front
    if args.front and args.format != "onnx" or args.push_to_hub and args.format != "pretrained":
        raise UsageError("--front is for --format onnx, --push-to-hub for --format pretrained")
    if whole == (choice.stitch is not None or choice.has_budget):
        raise UsageError("give --stitch ID, or a budget (--max-gflops, --max-params, --max-latency-ms) with --results; "
                         "or --front, or --format pretrained (every stitch)")
    # before any work: a bad --out fails at once (onnx and pretrained folders are written whole, never into old files)
    if args.format == "torch":
        writable_folder(args.out, "--out")
    else:
        check_free(args.out)
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)
    trained = load_trained(args.ckpt)
    net, results = trained.net, results_of(args.results) if args.results else trained.results
    if args.format == "pretrained":
        out = save_pretrained(net, trained.network, args.out, results, trained.class_names, trained.training)
        print(f"wrote {net.num_configs} stitches of {args.ckpt} to {out}")
        if args.push_to_hub:
            print(f"uploaded {out} to {args.push_to_hub}: {push_to_hub(out, args.push_to_hub)}")
        return
    if args.front:
        if results is None:
            raise UsageError("--front needs measured accuracies: give --results (snnet validate)")
        check_results_match(net, results)
    # a --results file is read by the choice itself, so that its errors name the file
    ids = ([r.id for r in pareto_front(results, metric=args.metric)] if args.front
           else [choice.resolve(net, None if args.results and Path(args.results).is_file() else results)])
    if args.format == "onnx":
        paths = export_onnx(net, ids, args.out, results, trained.class_names)
    else:
        paths = [export_stitch(net, ids[0], args.out, trained.network.model_kwargs)]
    for stitch, path in zip(ids, paths):
        info = net.infos[stitch]
        print(f"exported stitch {info.id} ({info.name}, {info.flops / 1e9:.4g} GFLOPs, {info.params} parameters) to {path}")


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

A language model's checkpoint is served for text instead: POST /v1/completions with an OpenAI-style
body ({"prompt": "...", "max_tokens": N, "temperature", "top_p", "top_k", "seed", "stream": true for
server-sent events}) and the same "stitch" or budgets (GFLOPs per token); --slo-ms is then the
target time per generated token, measured per stitch at start-up.
"""

def serve_command(argv: Sequence[str]) -> None:
    from snnet.serve.launch import ServeConfig, serve

    parser = new_parser("snnet serve", SERVE_HELP, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=str, required=True,
                        help="snnet fit checkpoint (e.g. outputs/quickstart/**/last.ckpt), pretrained folder or Hub repo id")
    parser.add_argument("--results", type=str | None,
                        help="results JSON with every stitch's accuracy (snnet validate/fit); default: a pretrained folder's own")
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
    parser.add_argument("--max-new-tokens", type=int, default=64, help="language model: a request's default max_tokens")
    parser.add_argument("--tokenizer", type=str | None,
                        help="language model: tokenizer directory or hub name (default: the one it was trained with, else bytes)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    options = parse(parser, argv).as_dict()
    options["api_key"] = options["api_key"] or os.environ.get("LIT_SERVER_API_KEY")
    serve(ServeConfig(**options))


LIGHTNING_COMMANDS = {
    "fit": "Train all stitches jointly (least-squares init at start).",
    "validate": "Score every stitch on the validation set; write results JSON/CSV and a Pareto plot.",
    "test": "Score every stitch on the test set.",
    "predict": "Predict class probabilities with one stitch: model.init_args.predict.stitch, or a budget (predict.max_gflops ... with predict.results).",
}
"""The Lightning subcommands (:mod:`snnet.trainer_cli`) and what each does."""


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "stitches": (stitches_command, "List the configurations of a family (id, name, FLOPs, params) without training."),
    "select": (select_command, "Pick the most accurate stitch for a FLOPs, parameter or latency budget."),
    "bench": (bench_command, "Measure on this device: `snnet bench latency` times every stitch for latency budgets."),
    "export": (export_command, "Write one stitch (id or budget) as a standalone model: its weights only, a recipe, a torch.export program."),
    "similarity": (similarity_command, "CKA and stitched-accuracy matrices between the layers of two models (heatmaps, JSON/CSV)."),
    "serve": (serve_command, "Serve every stitch over HTTP (LitServe): per-request stitch or budget, load-adaptive SLO policy, a page."),
}

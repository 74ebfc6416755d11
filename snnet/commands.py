"""The project's own subcommands: thin command lines over library functions."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml


def str2bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def network_section(path: Path) -> dict[str, Any]:
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


def stitches_command(argv: Sequence[str]) -> None:
    from snnet.anchors import NetworkConfig, build_network
    from snnet.results import StitchResult, print_table, save_results

    parser = argparse.ArgumentParser(prog="snnet stitches", description="List every configuration with FLOPs and parameters, without training.")
    parser.add_argument("--config", type=Path, help="YAML fit config whose model network section to use")
    parser.add_argument("--anchors", nargs="+", help="timm model names, any order (sorted fast-to-slow by FLOPs)")
    parser.add_argument("--pretrained", type=str2bool, help="load hub weights (true/false)")
    parser.add_argument("--checkpoints", nargs="+", help="one local checkpoint per anchor")
    parser.add_argument("--kernel-size", type=int)
    parser.add_argument("--stride", type=int)
    parser.add_argument("--nearest", type=str2bool, help="stitch adjacent anchors only (true/false)")
    parser.add_argument("--stitch-stages", type=int, nargs="+", help="stages where stitching is allowed")
    parser.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--json", type=Path, help="write the table as a JSON list here")
    args = parser.parse_args(argv)

    section = network_section(args.config) if args.config else {}
    overrides = {
        "anchors": args.anchors, "pretrained": args.pretrained, "checkpoints": args.checkpoints,
        "kernel_size": args.kernel_size, "stride": args.stride, "nearest": args.nearest,
        "stitch_stages": args.stitch_stages, "input_size": tuple(args.input_size) if args.input_size else None,
    }
    section.update({k: v for k, v in overrides.items() if v is not None})
    if args.num_classes is not None:
        section.setdefault("model_kwargs", {})["num_classes"] = args.num_classes
    if "anchors" not in section:
        parser.error("give --anchors or a --config with a network section")
    try:
        net = build_network(NetworkConfig(**section))
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"snnet stitches: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    rows = [StitchResult(i.id, i.name, i.flops, i.params, i.is_anchor) for i in net.table()]
    print_table(rows)
    if args.json:
        save_results(rows, args.json)
        print(f"wrote {len(rows)} configurations to {args.json}")


def select_command(argv: Sequence[str]) -> None:
    from snnet.results import load_results, select_stitch

    parser = argparse.ArgumentParser(prog="snnet select", description="The most accurate measured stitch within a budget.")
    parser.add_argument("--results", type=Path, required=True, help="results JSON written by snnet validate")
    parser.add_argument("--max-gflops", type=float)
    parser.add_argument("--max-params", type=float, help="parameter count, e.g. 5e6")
    parser.add_argument("--max-latency-ms", type=float)
    parser.add_argument("--metric", default="acc1", choices=["acc1", "acc5"])
    args = parser.parse_args(argv)
    if args.max_gflops is None and args.max_params is None and args.max_latency_ms is None:
        parser.error("give at least one budget: --max-gflops, --max-params or --max-latency-ms")
    try:
        best = select_stitch(
            load_results(args.results), max_gflops=args.max_gflops,
            max_params=args.max_params, max_latency_ms=args.max_latency_ms, metric=args.metric,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"snnet select: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    print(json.dumps(best.to_dict()))


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "stitches": (stitches_command, "List the configurations of a family (id, name, FLOPs, params) without training."),
    "select": (select_command, "Pick the most accurate stitch for a FLOPs, parameter or latency budget."),
}

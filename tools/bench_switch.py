"""Benchmark: switching stitches at inference, and an exported stitch's latency against the same stitch
inside the stitchable network.

1. ``net.set_stitch(i)``: median time of one switch over ``--switches`` random switches (target < 10 us);
2. a forward right after switching from another stitch vs a forward of the same stitch again (the
   cost a switch adds to the next batch: other weights, other caches);
3. ``extract_stitch`` (the standalone module ``snnet export`` writes) and its ``torch.export``
   program vs ``net(x)`` at that id: median latency, target within 3%.

Random weights (latency does not depend on them): DeiT-Ti/S/B at ``--img-size`` px and the CIFAR
ResNet-20/32/44/56 at 32 px. Variants are timed in alternating rounds so that drift on a shared
machine hits them alike. Usage:

    OMP_NUM_THREADS=1 python tools/bench_switch.py --out BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from bench_common import append_section, header_lines
from snnet.sn_net.build import NetworkConfig, build_network
from snnet.deploy.export import extract_stitch
from snnet.deploy.latency import median_ms
from snnet.sn_net.network import StitchableNetwork

FAMILIES = {
    "deit": ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"],
    "cifar": ["cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56"],
}
SWITCH_TARGET_US, LATENCY_TOLERANCE = 10.0, 0.03


def build(family: str, img_size: int) -> StitchableNetwork:
    torch.manual_seed(0)
    kwargs = {"img_size": img_size, "num_classes": 10} if family == "deit" else {}
    return build_network(NetworkConfig(anchors=FAMILIES[family], pretrained=False, model_kwargs=kwargs)).eval()


def switch_us(net: StitchableNetwork, switches: int, seed: int = 0) -> tuple[float, float]:
    """Median and 99th percentile of one ``set_stitch`` call to a random id, in microseconds."""
    rng = random.Random(seed)
    ids = [rng.randrange(net.num_configs) for _ in range(switches)]
    times = []
    for i in ids:
        start = time.perf_counter_ns()
        net.set_stitch(i)
        times.append(time.perf_counter_ns() - start)
    times.sort()
    return statistics.median(times) / 1e3, times[int(0.99 * (len(times) - 1))] / 1e3


@torch.inference_mode()
def forward_after_switch_ms(net: StitchableNetwork, x: Tensor, pairs: int, seed: int = 0) -> tuple[float, float]:
    """Median forward time of stitch s right after another stitch ran vs right after s itself ran."""
    rng = random.Random(seed)
    switched, same = [], []
    for _ in range(pairs):
        s, other = rng.sample(range(net.num_configs), 2)
        for previous, into in ((other, switched), (s, same)):
            net.set_stitch(previous)
            net(x)
            start = time.perf_counter()
            net.set_stitch(s)
            net(x)
            into.append(time.perf_counter() - start)
    return statistics.median(switched) * 1e3, statistics.median(same) * 1e3


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def alternating_median_ms(
    fns: dict[str, Callable[[Tensor], Tensor]], x: Tensor, rounds: int, repeats: int
) -> dict[tuple[str, str], float]:
    """(variant, clock) -> median over rounds of the variant's median latency; the variants alternate
    within every round, and every clock times its own forwards."""
    per_round: dict[tuple[str, str], list[float]] = {(name, c): [] for name in fns for c in CLOCKS}
    for _ in range(rounds):
        for name, fn in fns.items():
            for c, clock in CLOCKS.items():
                per_round[(name, c)].append(median_ms(fn, x, warmup=1, repeats=repeats, clock=clock))
    return {key: statistics.median(v) for key, v in per_round.items()}


def export_rows(net: StitchableNetwork, family: str, x: Tensor, rounds: int, repeats: int) -> list[str]:
    """Latency of the network at an id vs its standalone module and torch.export program (cheapest
    anchor, the middle configuration, the slowest anchor)."""
    rows = []
    for stitch in (0, net.num_configs // 2, net.num_anchors - 1):
        module = extract_stitch(net, stitch).eval()
        with torch.no_grad():
            program = torch.export.export(module, (x,)).module()
        times = alternating_median_ms({
            "network": lambda b, s=stitch: net(b, s), "standalone": module, "program": program,
        }, x, rounds, repeats)
        for clock in CLOCKS:
            base = times[("network", clock)]
            rows.append(f"| {family} | {stitch} | {net.infos[stitch].name} | {clock} | {base:.3f} | "
                        f"{_against(times[('standalone', clock)], base)} | {_against(times[('program', clock)], base)} |")
    return rows


def _against(ms: float, base: float) -> str:
    within = abs(ms / base - 1) <= LATENCY_TOLERANCE
    return f"{ms:.3f} ({ms / base - 1:+.1%}, {'within' if within else 'OUTSIDE'} {LATENCY_TOLERANCE:.0%})"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--img-size", type=int, default=64, help="DeiT input size (timm img_size)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--switches", type=int, default=100_000)
    parser.add_argument("--pairs", type=int, default=200, help="forward-after-switch samples")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per variant and round")
    parser.add_argument("--out", type=Path, help="append the Markdown section to this file")
    args = parser.parse_args(argv)

    switch_lines, export_lines = [], []
    for family in args.family:
        net = build(family, args.img_size)
        x = torch.randn(args.batch_size, *net.profiles[0].input_size)
        median_us, p99_us = switch_us(net, args.switches)
        switched, same = forward_after_switch_ms(net, x, args.pairs)
        switch_lines.append(
            f"| {family} | {net.num_configs} | {median_us:.2f} | {p99_us:.2f} | "
            f"{'met' if median_us < SWITCH_TARGET_US else 'NOT met'} | {switched:.3f} | {same:.3f} | {switched / same - 1:+.1%} |"
        )
        export_lines += export_rows(net, family, x, args.rounds, args.repeats)
        print(switch_lines[-1], *export_lines[-6:], sep="\n", flush=True)

    size = f"DeiT at {args.img_size} px, CIFAR ResNets at 32 px, batch {args.batch_size}, random weights"
    lines = header_lines("Switching stitches at inference; exported stitch latency", argv) + [
        f"Switching ({size}): one `set_stitch` call timed {args.switches} times (random ids, `perf_counter_ns` "
        f"around each call, so the timer's own cost is included); forward of stitch s right after another stitch ran "
        f"vs right after s itself ran, median of {args.pairs} random pairs (the switch is inside the timed span).",
        "",
        "| family | stitches | set_stitch median us | p99 us | < 10 us | forward after a switch ms | forward, same stitch ms | difference |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
        *switch_lines,
        "",
        f"Exported stitch vs the same stitch in the stitchable network ({size}): median over {args.rounds} alternating "
        f"rounds of each variant's median of {args.repeats} forwards (ms), by wall clock and by this process's CPU time "
        f"(which the other jobs on a shared machine hardly inflate); in brackets the difference to the network.",
        "",
        "| family | id | stitch | clock | network ms | standalone module ms | torch.export program ms |",
        "|---|---:|---|---|---:|---:|---:|",
        *export_lines,
    ]
    append_section(args.out, lines)


if __name__ == "__main__":
    main()

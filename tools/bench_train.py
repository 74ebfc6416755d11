"""Training throughput: SN-Net's stitchable step against the same sub-network trained alone.

For a fixed sample of configurations, alternates (A B, B A, A B, ...):
  A  the SN-Net step: ``net.set_stitch(id)``, forward through the StitchableNetwork, loss,
     backward, AdamW step with the optimizer over *all* parameters (as in joint training);
  B  the plain step: the same modules as an ordinary ``nn.Sequential``, AdamW over that
     sub-network's parameters only (what training it alone would be);
with the same batch, precision, compile setting and optimizer settings. Reports median img/s per
configuration and the ratio A/B time (the stitching overhead). Also times the teacher forward
(largest anchor, inference mode) and the least-squares init.

    python tools/bench_train.py --family cifar                      # CPU, 32 px
    python tools/bench_train.py --family deit --precision bf16 --compile --device cuda
    python tools/bench_train.py --family cifar --markdown BENCHMARKS.md   # append the table
    python tools/bench_train.py --family tiny --batch-size 4 --steps 1 --rounds 1 --json t.json  # a smoke run

Uniform sampling (what joint training does) visits every configuration equally often, so its
expected img/s is ``batch / mean step time over all configurations``; each side's step time is
modelled as proportional to FLOPs, its seconds per FLOP fitted on the timed sample (total time over
total FLOPs). The plain side of that is the FLOPs-weighted plain figure; the issue's target is the
SN-Net figure >= 0.95x of it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snnet.sn_net.build import NetworkConfig, build_network  # noqa: E402
from snnet.sn_net.compile import compile_stitchable  # noqa: E402
from snnet.sn_net.network import StitchableNetwork  # noqa: E402

FAMILIES: dict[str, dict] = {
    "cifar": {"anchors": ["cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56"], "input_size": (3, 32, 32),
              "model_kwargs": {}, "batch_size": 128},
    "deit": {"anchors": ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"], "input_size": (3, 224, 224),
             "model_kwargs": {}, "batch_size": 128},
    "tiny": {"anchors": ["cifar_resnet8", "cifar_resnet14"], "input_size": (3, 16, 16), "model_kwargs": {}, "batch_size": 8},  # smoke runs
}


class Call(nn.Module):
    """A view's stem or head (a function over the anchor's modules) as a module in a Sequential."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def plain_subnetwork(net: StitchableNetwork, stitch: int) -> nn.Sequential:
    """Configuration ``stitch`` as an ordinary Sequential of the very same modules (shared weights);
    the stem and head, functions over an anchor's modules, wrapped as modules."""
    return nn.Sequential(*(m if isinstance(m, nn.Module) else Call(m) for m in net.path_modules(stitch)))


@dataclass
class Step:
    """One training step of ``forward`` with its own optimizer; ``before`` runs first (the switch)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    before: Callable[[], None] = lambda: None


def adamw(params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")


def run_steps(step: Step, x: torch.Tensor, y: torch.Tensor, count: int, autocast: contextlib.AbstractContextManager) -> float:
    """Seconds for ``count`` training steps (device synchronised)."""
    sync(x.device)
    start = time.perf_counter()
    for _ in range(count):
        step.before()
        with autocast:
            loss = F.cross_entropy(step.forward(x), y)
        loss.backward()
        step.optimizer.step()
        step.optimizer.zero_grad(set_to_none=True)
    sync(x.device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sample_configs(net: StitchableNetwork, count: int) -> list[int]:
    """A fixed, spread sample: the smallest and largest anchor and evenly spaced stitches."""
    stitches = list(range(net.num_anchors, net.num_configs))
    k = min(max(count - 2, 0), len(stitches))
    picks = [stitches[i * (len(stitches) - 1) // max(1, k - 1)] for i in range(k)]
    return sorted({0, net.num_anchors - 1, *picks})


def time_teacher(net: StitchableNetwork, x: torch.Tensor, precision: str, backend: str | None, repeats: int) -> float:
    """img/s of the largest anchor's forward in inference mode (the distillation teacher), compiled
    with ``backend`` unless it is None."""
    teacher = net.anchors[-1].eval()
    forward = torch.compile(teacher, backend=backend) if backend else teacher
    autocast = autocast_for(x.device, precision)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            sync(x.device)
            start = time.perf_counter()
            with autocast:
                forward(x)
            sync(x.device)
            if i >= 2:
                times.append(time.perf_counter() - start)
    teacher.train()
    return x.shape[0] / statistics.median(times)


def time_lstsq_init(net: StitchableNetwork, images: int, batch_size: int, device: torch.device) -> float:
    x = torch.randn(images, *net.profiles[0].input_size, device=device)
    sync(device)
    start = time.perf_counter()
    net.init_stitches_lstsq(x.split(batch_size))
    sync(device)
    return time.perf_counter() - start


def versions() -> str:
    import lightning
    import timm

    return f"torch {torch.__version__}, lightning {lightning.__version__}, timm {timm.__version__}, Python {platform.python_version()}"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {torch.get_num_threads()} CPU threads"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="cifar")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--configs", type=int, default=4, help="how many configurations to sample (anchors 0 and last included)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="A B blocks per configuration (median over rounds)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile both A (one graph per configuration) and B")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    parser.add_argument("--lstsq-images", type=int, default=100)
    parser.add_argument("--markdown", type=Path, help="append the results as a section of this file (e.g. BENCHMARKS.md)")
    parser.add_argument("--json", type=Path, help="write the rows and the uniform-sampling figures to this JSON file")
    args = parser.parse_args(argv)

    import snnet.models  # noqa: F401  (registers the CIFAR ResNets)

    device = torch.device(args.device)
    family = FAMILIES[args.family]
    batch_size = args.batch_size or family["batch_size"]
    torch.manual_seed(0)
    net = build_network(NetworkConfig(anchors=family["anchors"], pretrained=False, model_kwargs=family["model_kwargs"],
                                      input_size=family["input_size"])).to(device).train()
    x = torch.randn(batch_size, *family["input_size"], device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    autocast = autocast_for(device, args.precision)
    ids = sample_configs(net, args.configs)
    print(f"{args.family}: {net.num_configs} configurations, timing ids {ids}, batch {batch_size}, {args.precision}, "
          f"compile={args.compile}, {machine(device)}")

    stitchable = compile_stitchable(net, backend=args.compile_backend) if args.compile else net
    joint = Step(stitchable, adamw(list(net.parameters()), device))
    rows = []
    for stitch in ids:
        joint.before = lambda s=stitch: net.set_stitch(s)
        sub = plain_subnetwork(net, stitch)
        plain = Step(torch.compile(sub, backend=args.compile_backend) if args.compile else sub, adamw(net.path_parameters(stitch), device))
        warm = time.perf_counter()
        for step in (joint, plain):  # warm-up: compilation, allocator, optimizer state
            run_steps(step, x, y, 2, autocast)
        warm = time.perf_counter() - warm
        a_times, b_times = [], []
        for round_ in range(args.rounds):  # A B, B A, ...: neither side always runs first
            for step, times in ((joint, a_times), (plain, b_times))[:: 1 if round_ % 2 == 0 else -1]:
                times.append(run_steps(step, x, y, args.steps, autocast))
        a, b = statistics.median(a_times), statistics.median(b_times)
        per_round = [ta / tb for ta, tb in zip(a_times, b_times)]  # the spread says how noisy the machine was
        imgs = batch_size * args.steps
        rows.append((stitch, net.infos[stitch].name, net.infos[stitch].flops / 1e9, imgs / a, imgs / b, a / b,
                     min(per_round), max(per_round), warm))
        print(f"  id {stitch:3d} {net.infos[stitch].name:<28} stitchable {imgs / a:8.1f} img/s  plain {imgs / b:8.1f} img/s  "
              f"ratio {a / b:.3f} (rounds {min(per_round):.2f}-{max(per_round):.2f})  warm-up {warm:.1f} s")
    teacher = time_teacher(net, x, args.precision, args.compile_backend if args.compile else None, repeats=args.rounds)
    lstsq = time_lstsq_init(net, args.lstsq_images, 50, device)
    overhead = statistics.median(r[5] for r in rows)
    uniform = uniform_sampling(net, rows, batch_size)
    print(f"teacher ({net.anchor_names[-1]}) forward: {teacher:.1f} img/s; LS init of {len(net.stitch_layers)} layers on "
          f"{args.lstsq_images} images: {lstsq:.2f} s; median stitching overhead {100 * (overhead - 1):+.1f}%; uniform "
          f"sampling {uniform['stitchable_img_s']:.1f} img/s vs FLOPs-weighted plain {uniform['plain_img_s']:.1f} img/s "
          f"({uniform['ratio']:.3f}x)")
    if args.markdown:
        append_markdown(args, rows, teacher, lstsq, net, device, batch_size, overhead, uniform)
    if args.json:
        keys = ("id", "name", "gflops", "stitchable_img_s", "plain_img_s", "time_ratio", "round_ratio_min", "round_ratio_max", "warmup_s")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "family": args.family, "precision": args.precision, "compile": args.compile, "batch_size": batch_size,
            "device": machine(device), "versions": versions(), "configurations": net.num_configs,
            "rows": [{**dict(zip(keys, r)), "is_anchor": net.infos[r[0]].is_anchor} for r in rows],
            "median_overhead": overhead, "uniform": uniform, "teacher_img_s": teacher, "lstsq_s": lstsq,
        }, indent=1))


def uniform_sampling(net: StitchableNetwork, rows: list[tuple], batch_size: int) -> dict[str, float]:
    """Expected img/s of each side when every configuration is trained equally often (module docstring)."""
    flops = sum(r[2] for r in rows)
    mean_flops = statistics.fmean(info.flops / 1e9 for info in net.infos)
    seconds = {side: sum(batch_size / r[column] for r in rows) / flops * mean_flops for side, column in (("stitchable", 3), ("plain", 4))}
    return {"stitchable_img_s": batch_size / seconds["stitchable"], "plain_img_s": batch_size / seconds["plain"],
            "ratio": seconds["plain"] / seconds["stitchable"]}


def append_markdown(args, rows, teacher: float, lstsq: float, net: StitchableNetwork, device: torch.device,
                    batch_size: int, overhead: float, uniform: dict[str, float]) -> None:
    command = "python tools/bench_train.py " + " ".join(sys.argv[1:])
    lines = [
        f"\n## Training step: stitchable vs plain sub-network ({args.family}, {args.precision}, "
        f"{'compiled' if args.compile else 'eager'}, {device.type})\n",
        f"- date: {datetime.date.today()}; machine: {machine(device)}; {versions()}",
        f"- command: `{command}`",
        f"- batch {batch_size}, {args.steps} steps per block, {args.rounds} rounds per configuration (A B, then B A, ...), median; "
        f"{net.num_configs} configurations in the family\n",
        "| id | configuration | GFLOPs | stitchable img/s | plain img/s | time ratio | per-round ratios |",
        "|---:|---|---:|---:|---:|---:|---:|",
        *[f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.3f} | {r[6]:.2f}-{r[7]:.2f} |" for r in rows],
        "",
        f"Median stitching overhead: {100 * (overhead - 1):+.1f}%. Uniform sampling over all {net.num_configs} "
        f"configurations (FLOPs-proportional model): {uniform['stitchable_img_s']:.1f} img/s against the FLOPs-weighted "
        f"plain {uniform['plain_img_s']:.1f} img/s ({uniform['ratio']:.3f}x). Teacher ({net.anchor_names[-1]}, inference mode) "
        f"forward: {teacher:.1f} img/s. Least-squares init of {len(net.stitch_layers)} stitching layers on "
        f"{args.lstsq_images} images: {lstsq:.2f} s.",
    ]
    with open(args.markdown, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {args.markdown}")


if __name__ == "__main__":
    main()

"""Benchmark: score every stitch in one pass over the loader (shared prefixes, ``snnet.deploy.evaluate``)
against the reference SN-Net loop (one full pass over the loader per stitch).

Families:

* ``deit``: DeiT-Ti/S/B (71 configurations), random weights at ``--img-size`` px (timm ``img_size``),
  ``--num-classes`` classes, on a folder of synthetic JPEGs of ImageNet-like size
  (``--jpeg-size``, smooth random content so they compress like photos), decoded and resized by
  timm's eval transform as ImageNet validation images are;
* ``tiny``: two random CIFAR ResNets (8, 14) on the same synthetic JPEGs at ``--img-size`` px (smoke runs);
* ``cifar``: the pretrained CIFAR ResNet-20/32/44/56 (40 configurations, stitching layers fitted by
  least squares on 100 training images) on the real CIFAR-10 JPEG test set (``--val-limit`` images);
  needs ``SNNET_ANCHOR_DIR`` and ``SNNET_DATA_DIR``.

Per family: the FLOPs ratio (shared vs naive, counted), the compute-only time ratio (the same
batches preloaded in memory), the end-to-end time ratio (DataLoader included), and whether both
modes predict the same class for every image and stitch. Times are the best of ``--repeats`` runs,
the two modes alternating. Usage:

    OMP_NUM_THREADS=1 python tools/bench_eval.py --family deit cifar --out BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from bench_common import Seconds, append_section, header_lines, timed
from snnet.sn_net.build import NetworkConfig, build_network
from snnet.data import CIFAR10JPEGDataModule, ImageDataModule, ImageFolderDataModule
from snnet.deploy.evaluate import Evaluation, evaluate_stitches
from snnet.models.cifar_resnet import pretrained_checkpoints
from snnet.sn_net.network import StitchableNetwork

DEIT = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
TINY = ["cifar_resnet8", "cifar_resnet14"]
CIFAR = ["cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56"]
TARGET = 0.35


@dataclass
class Row:
    family: str
    stitches: int
    images: int
    flops_ratio: float
    times: dict[tuple[str, str], Seconds]  # (memory | loader | load-only, naive | shared) -> best time
    identical: bool
    note: str

    def ratio(self, source: str, clock: str) -> float:
        return getattr(self.times[(source, "shared")], clock) / getattr(self.times[(source, "naive")], clock)


def write_jpeg_folder(root: Path, images: int, classes: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``root/{train,val}/<class>/*.jpg``: smooth random photos-like JPEGs (quality 90), written once."""
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    width, height = size
    for split, count in (("train", classes), ("val", images)):
        for i in range(count):
            folder = root / split / f"class{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = Image.fromarray(rng.integers(0, 256, (height // 24, width // 24, 3), dtype=np.uint8))
            smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
            grain = rng.normal(0.0, 6.0, smooth.shape).astype(np.float32)
            Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    done.touch()
    return root


def synthetic_setup(family: str, args: argparse.Namespace) -> tuple[StitchableNetwork, ImageDataModule, str]:
    """``deit`` or ``tiny`` with random weights at ``--img-size`` px, on the synthetic JPEG folder."""
    torch.manual_seed(0)
    if family == "deit":
        config = NetworkConfig(anchors=DEIT, pretrained=False, model_kwargs={"img_size": args.img_size, "num_classes": args.num_classes})
    else:
        config = NetworkConfig(anchors=TINY, pretrained=False, model_kwargs={"num_classes": args.num_classes},
                               input_size=(3, args.img_size, args.img_size))
    net = build_network(config)
    width, height = args.jpeg_size
    root = Path(args.jpeg_root or f"~/.cache/snnet/bench_jpeg_{args.images}_{width}x{height}").expanduser()
    write_jpeg_folder(root, args.images, args.num_classes, (width, height))
    kb = np.mean([p.stat().st_size for p in (root / "val").rglob("*.jpg")]) / 1024
    dm = ImageFolderDataModule(root=str(root), data_config=net.data_config(), eval_batch_size=args.batch_size,
                               num_workers=args.num_workers)
    note = (f"random weights, {args.img_size} px, {args.num_classes} classes; {args.images} synthetic {width}x{height} "
            f"JPEGs ({kb:.0f} KB on average) resized by timm's eval transform")
    return net, dm, note


def cifar_setup(args: argparse.Namespace) -> tuple[StitchableNetwork, ImageDataModule, str]:
    anchor_dir = os.environ.get("SNNET_ANCHOR_DIR")
    if not anchor_dir:
        raise SystemExit("the cifar family needs SNNET_ANCHOR_DIR (the resnet*.th files) and SNNET_DATA_DIR")
    checkpoints = pretrained_checkpoints(anchor_dir)
    net = build_network(NetworkConfig(anchors=list(checkpoints), pretrained=False, checkpoints=list(checkpoints.values())))
    dm = CIFAR10JPEGDataModule(data_config=net.data_config(), eval_batch_size=args.batch_size,
                               num_workers=args.num_workers, val_limit=args.val_limit)
    images, _ = dm.calibration_batch(100)
    net.init_stitches_lstsq(images.split(50))
    return net, dm, "pretrained anchors, stitches least-squares initialised on 100 training images; real CIFAR-10 JPEG test images"


def same_predictions(runs: Sequence[Evaluation]) -> bool:
    first = runs[0].predictions
    return all(first.keys() == r.predictions.keys() and all(torch.equal(first[i], r.predictions[i]) for i in first)
               for r in runs[1:])


def bench_family(family: str, args: argparse.Namespace) -> Row:
    net, dm, note = cifar_setup(args) if family == "cifar" else synthetic_setup(family, args)
    net.to(args.device).eval()  # evaluate_stitches moves each batch to the network's device
    ids = list(range(net.num_configs))
    flops_ratio = net.forward_many_flops(ids) / sum(net.infos[i].flops for i in ids)
    loader = dm.val_dataloader()
    times: dict[tuple[str, str], Seconds] = {}

    def keep_best(key: tuple[str, str], seconds: Seconds) -> None:
        old = times.get(key, Seconds(float("inf"), float("inf")))
        times[key] = Seconds(min(old.wall, seconds.wall), min(old.cpu, seconds.cpu))

    batches: list = []
    for _ in range(2):  # the first pass also warms the file cache
        seconds, batches = timed(lambda: list(loader))
        keep_best(("load-only", "one pass"), seconds)
    images = sum(len(b[0]) for b in batches)
    runs: list[Evaluation] = []
    for repeat in range(args.repeats):
        for source_name, source in (("memory", batches), ("loader", loader)):
            for mode in ("naive", "shared"):
                seconds, run = timed(lambda: evaluate_stitches(net, source, ids, mode=mode, keep_predictions=True))
                keep_best((source_name, mode), seconds)
                runs.append(run)
                print(f"{family} repeat {repeat}: {source_name} {mode} {seconds.cpu:.2f} s CPU, {seconds.wall:.2f} s wall", flush=True)
    if family == "cifar":
        note += "; anchors' top-1 % on these images: " + ", ".join(f"{r.name} {r.acc1:.2f}" for r in runs[-1].results if r.is_anchor)
    return Row(family, len(ids), images, flops_ratio, times, same_predictions(runs), note)


def report(rows: list[Row], args: argparse.Namespace, argv: Sequence[str] | None) -> list[str]:
    lines = header_lines("Evaluating every stitch: one shared pass vs one pass per stitch", argv)
    for clock, title in (("cpu", "CPU time of the process (s)"), ("wall", "wall time (s)")):
        lines += [
            f"{title}, best of {args.repeats}:",
            "",
            "| family | stitches | images | FLOPs ratio | compute naive | compute shared | compute ratio "
            "| one loader pass | end-to-end naive | end-to-end shared | end-to-end ratio | same predictions |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            t = {key: getattr(v, clock) for key, v in r.times.items()}
            lines.append(
                f"| {r.family} | {r.stitches} | {r.images} | {r.flops_ratio:.3f} | {t[('memory', 'naive')]:.1f} | "
                f"{t[('memory', 'shared')]:.1f} | {r.ratio('memory', clock):.3f} | {t[('load-only', 'one pass')]:.2f} | "
                f"{t[('loader', 'naive')]:.1f} | {t[('loader', 'shared')]:.1f} | {r.ratio('loader', clock):.3f} | "
                f"{'yes' if r.identical else 'NO'} |"
            )
        lines.append("")
    for r in rows:
        ratio, compute_ratio = r.ratio("loader", "cpu"), r.ratio("memory", "cpu")
        load = r.times[("load-only", "one pass")].cpu
        per_stitch = r.times[("memory", "naive")].cpu / r.stitches  # one stitch's compute over all images
        needed = r.stitches * (compute_ratio - TARGET) / (TARGET * r.stitches - 1)
        lines.append(
            f"- {r.family}: {r.note}; batches of {args.batch_size} on {args.device}, {args.num_workers} loader workers. "
            f"**Target <= {TARGET}x end to end: {'met' if ratio <= TARGET else 'not met'} ({ratio:.3f}x CPU time, "
            f"{r.ratio('loader', 'wall'):.3f}x wall).** The shared pass reads the data once instead of {r.stitches} "
            f"times and runs {r.flops_ratio:.0%} of the FLOPs ({compute_ratio:.0%} of the compute time). With loading "
            f"L and one stitch's compute C over the same images, end-to-end = (L + {compute_ratio:.2f} N C) / (N L + N C) "
            f"for N = {r.stitches}: it reaches {TARGET}x only when L >= {needed:.2f} C; here L = {load:.2f} s and "
            f"C = {per_stitch:.2f} s (L = {load / per_stitch:.2f} C)."
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", choices=["deit", "cifar", "tiny"], default=["deit", "cifar"])
    parser.add_argument("--img-size", type=int, default=64, help="DeiT input size (timm img_size)")
    parser.add_argument("--num-classes", type=int, default=10, help="DeiT classes")
    parser.add_argument("--images", type=int, default=32, help="DeiT: synthetic validation JPEGs")
    parser.add_argument("--jpeg-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    parser.add_argument("--jpeg-root", help="where to write the synthetic JPEGs (default ~/.cache/snnet/...)")
    parser.add_argument("--val-limit", type=int, default=256, help="CIFAR: test images (a fixed random subset)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (the GPU regime, where loading weighs more)")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--flops-only", action="store_true", help="print the FLOPs ratio only (no timing, no data)")
    parser.add_argument("--out", type=Path, help="append the Markdown section to this file")
    parser.add_argument("--json", type=Path, help="write each family's figures (ratios, times, same predictions) to this JSON file")
    args = parser.parse_args(argv)
    if args.flops_only:
        for family in args.family:
            net = build_network(NetworkConfig(anchors={"deit": DEIT, "cifar": CIFAR, "tiny": TINY}[family], pretrained=False,
                                              model_kwargs={"img_size": args.img_size} if family == "deit" else {}))
            ids = list(range(net.num_configs))
            print(f"{family}: {len(ids)} stitches, FLOPs ratio shared/naive "
                  f"{net.forward_many_flops(ids) / sum(net.infos[i].flops for i in ids):.4f}")
        return
    rows = [bench_family(family, args) for family in args.family]
    append_section(args.out, report(rows, args, argv))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([figures(r, args) for r in rows], indent=1))


def figures(row: Row, args: argparse.Namespace) -> dict:
    """One family's row as JSON: the ratios (CPU and wall clock) and every best time."""
    return {
        "family": row.family, "stitches": row.stitches, "images": row.images, "flops_ratio": row.flops_ratio,
        "end_to_end_ratio": {clock: row.ratio("loader", clock) for clock in ("cpu", "wall")},
        "compute_ratio": {clock: row.ratio("memory", clock) for clock in ("cpu", "wall")},
        "times_s": {f"{source} {mode}": {"wall": t.wall, "cpu": t.cpu} for (source, mode), t in row.times.items()},
        "same_predictions": row.identical, "device": args.device, "batch_size": args.batch_size,
        "num_workers": args.num_workers, "target": TARGET, "note": row.note,
    }


if __name__ == "__main__":
    main()

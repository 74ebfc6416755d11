"""StitchNet on the shared CIFAR-10 data from a pool of the pretrained CIFAR ResNet-20/32/44/56.

Composes networks from ``--samples`` un-augmented training images (no backpropagation), scores
every candidate on the full test set of the task's classes, and prints / writes the ranked table
with each network's size relative to the anchors and the wall time of the composition (loading the
samples, running the pool on them, the search, bridges and heads). Needs SNNET_ANCHOR_DIR and
SNNET_DATA_DIR. Examples::

    python tools/stitchnet_cifar.py --samples 32                       # 10 classes, original head
    python tools/stitchnet_cifar.py --classes 3 5 --samples 32 --head ridge   # cat vs dog
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from snnet.data import CIFAR10JPEGDataModule  # noqa: E402
from snnet.stitchnet.fragments import pool_activations  # noqa: E402
from snnet.models.cifar_resnet import pretrained_checkpoints  # noqa: E402
from snnet.stitchnet.composition import compose, evaluate, print_candidates, save_candidates  # noqa: E402
from snnet.stitchnet.module import PoolConfig, build_pool  # noqa: E402
from snnet.stitchnet.search import ComposeConfig  # noqa: E402



def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, nargs="+", help="a subset of CIFAR-10 class indices (default: all 10)")
    p.add_argument("--samples", type=int, default=32, help="training images used for CKA, bridges and head")
    p.add_argument("--head", default="auto", choices=["auto", "original", "ridge", "class_means"])
    p.add_argument("--span", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--max-fragments", type=int, default=16)
    p.add_argument("--max-networks", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="which training images are drawn")
    p.add_argument("--no-cache", action="store_true", help="recompute the pool's activations (cold-start timing)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the ranked candidates and figures as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    anchor_dir = os.environ.get("SNNET_ANCHOR_DIR")
    if not anchor_dir:
        p.error("set SNNET_ANCHOR_DIR to the folder holding the resnet*.th checkpoints")

    checkpoints = pretrained_checkpoints(anchor_dir)
    pool = build_pool(PoolConfig(models=list(checkpoints), pretrained=False, checkpoints=list(checkpoints.values())))
    from timm.data import resolve_data_config

    data_config = {**resolve_data_config(model=pool.models["cifar_resnet20"]), "input_size": pool.input_size}
    dm = CIFAR10JPEGDataModule(data_config=data_config, batch_size=500, num_workers=1, train_transform="eval",
                               classes=args.classes, seed=args.seed)
    cfg = ComposeConfig(span=args.span, threshold=args.threshold, max_fragments=args.max_fragments,
                        max_networks=args.max_networks, head=args.head)

    start, cpu_start = time.perf_counter(), time.process_time()
    x, y = dm.calibration_batch(args.samples)
    t_samples = time.perf_counter() - start
    acts = pool_activations(pool, x, cache=not args.no_cache)
    t_acts = time.perf_counter() - start - t_samples
    composition = compose(pool, x, y, cfg, classes=args.classes, activations=acts)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    start_eval = time.perf_counter()
    evaluate(composition, dm.val_dataloader())
    t_eval = time.perf_counter() - start_eval
    print_candidates(composition)

    cands = composition.candidates
    composed = [c for c in cands if not c.is_anchor] or cands
    best_score, best_acc = composed[0], max(composed, key=lambda c: (c.acc1, -c.params))
    anchors = pool.anchor_params
    rows = {"top-score composed network": best_score, "best composed network on the test set": best_acc,
            **{f"anchor {c.name}": c for c in cands if c.is_anchor}}
    figures = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "classes": args.classes or list(range(10)), "samples": int(x.shape[0]), "head": composition.head,
        "test_images": len(dm.val_set), "candidates": len(cands),
        "cpu_s_composition": cpu,  # this process's CPU time: the machine may be shared
        "wall_s": {"composition": wall, "load_samples": t_samples, "pool_activations": t_acts,
                   "search_bridges_heads": wall - t_samples - t_acts, "evaluation": t_eval},
        "activations_from_cache": acts.from_cache, "threads": torch.get_num_threads(),
        "anchor_params": anchors,
        "summary": {label: {"id": c.id, "name": c.name, "score": c.score, "acc1": c.acc1, "params": c.params,
                            "params_vs_anchors": {k: c.params / v for k, v in anchors.items()}} for label, c in rows.items()},
    }
    print(json.dumps({k: v for k, v in figures.items() if k != "summary"}, indent=1))
    for label, c in rows.items():
        rel = ", ".join(f"{k.removeprefix('cifar_')} {c.params / v:.2f}x" for k, v in anchors.items())
        print(f"{label}: #{c.id} {c.name}  score {c.score:.3f}  top-1 {c.acc1:.2f}%  params {c.params / 1e6:.3f}M ({rel})")
    if args.out:
        save_candidates(composition, args.out, figures)
        print(f"wrote {args.out}")
    return figures


if __name__ == "__main__":
    main()

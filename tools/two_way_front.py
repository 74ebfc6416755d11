"""SN-Net's space vs SN-Netv2's two-way space, plain vs LoRA stitching layers, on one fit config.

Trains each variant for the same number of steps (so the two-way space spreads them over more
configurations), scores every configuration on the validation split and prints the front figures:
stitches on the measured accuracy-FLOPs front, stitches more than 1 point below the lower anchor of
their pair, and the median signed gap to the straight line between their pair's anchors at their
FLOPs (FLOPs clamped to the anchors' range).

    python tools/pretrain_quickstart.py
    python tools/two_way_front.py --config configs/quickstart.yaml --steps 250 --lora-rank 8
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import lightning as L
import yaml

from snnet.anchors import expand_path
from snnet.front import front_figures
from snnet.sn_net.module import SNNetModule


def subset(network: dict, anchors: list[int] | None) -> dict:
    """The config's network with only the anchors at these indices (their checkpoints follow)."""
    if anchors is None:
        return network
    names = network["anchors"]
    bad = [i for i in anchors if not 0 <= i < len(names)]
    if bad:
        raise SystemExit(f"--anchors {bad}: the config has anchors 0..{len(names) - 1} ({names})")
    out = {**network, "anchors": [names[i] for i in anchors]}
    if network.get("checkpoints"):
        out["checkpoints"] = [network["checkpoints"][i] for i in anchors]
    return out


def build(config: dict, two_way: bool, lora_rank: int, num_workers: int | None = None, freeze_anchors: bool = False,
          anchors: list[int] | None = None, val_limit: int | None = None) -> tuple[SNNetModule, L.LightningDataModule]:
    init = config["model"]["init_args"]
    network = {**subset(init["network"], anchors), "two_way": two_way, "stitch_lora_rank": lora_rank}
    optim = {**init.get("optim", {}), **({"freeze_anchors": True} if freeze_anchors else {})}
    L.seed_everything(config.get("seed_everything", 0))
    module = SNNetModule(**{**init, "network": network, "optim": optim})
    module_name, cls = config["data"]["class_path"].rsplit(".", 1)
    data_cls = getattr(importlib.import_module(module_name), cls)
    data_args = {**config["data"].get("init_args", {}), **({} if num_workers is None else {"num_workers": num_workers}),
                 **({} if val_limit is None else {"val_limit": val_limit})}
    data = data_cls(data_config=module.data_config, **data_args)
    return module, data


def run_variant(config: dict, two_way: bool, lora_rank: int, steps: int, val_batches: float,
                num_workers: int | None = None, freeze_anchors: bool = False, anchors: list[int] | None = None,
                val_limit: int | None = None, accelerator: str = "cpu") -> dict:
    module, data = build(config, two_way, lora_rank, num_workers, freeze_anchors, anchors, val_limit)
    trainable = sum(p.numel() for p in module.net.stitch_layers.parameters() if p.requires_grad)
    start = time.perf_counter()
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, data)
    train_s = time.perf_counter() - start
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                        limit_val_batches=val_batches, enable_model_summary=False)
    trainer.validate(module, data, verbose=False)
    figures = front_figures(module.results)
    anchor_acc = [r.acc1 for r in module.results if r.is_anchor]
    return {"two_way": two_way, "lora_rank": lora_rank, "freeze_anchors": freeze_anchors, "configs": module.net.num_configs, "steps": steps,
            "anchors": module.net.anchor_names, "anchor_acc1": anchor_acc, "best_stitch_acc1": max(r.acc1 for r in module.results if not r.is_anchor),
            "steps_per_config": steps / module.net.num_configs, "trainable_stitch_params": trainable,
            "train_s": round(train_s, 1), "stitches": figures.stitches, "on_front": figures.on_front,
            "below_lower_anchor": figures.below_lower, "median_gap": figures.median_gap, "results": [r.to_dict() for r in module.results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=250, help="training steps per variant (same for all)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--val-batches", type=float, default=1.0, help="Lightning limit_val_batches (int: batches; the first "
                        "batches of a class-sorted set such as CIFAR-10's are one class: use --val-limit there)")
    parser.add_argument("--val-limit", type=int, help="score on a fixed random subset of this many validation images (classes mixed)")
    parser.add_argument("--variants", nargs="+", default=["sl", "two_way", "sl_lora", "two_way_lora"],
                        choices=["sl", "two_way", "sl_lora", "two_way_lora"])
    parser.add_argument("--num-workers", type=int, help="data loader workers (default: the config's)")
    parser.add_argument("--freeze-anchors", action="store_true", help="anchor-preserving training in every variant (optim.freeze_anchors)")
    parser.add_argument("--anchors", type=int, nargs="+", help="indices of the config's anchors to use (default: all)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator (cpu, gpu, auto)")
    parser.add_argument("--out", type=Path, default=Path("outputs/two_way_front.json"))
    args = parser.parse_args()
    config = yaml.safe_load(expand_path(args.config).read_text())
    val_batches = int(args.val_batches) if args.val_batches > 1 else args.val_batches
    rows = []
    for variant in args.variants:
        row = run_variant(config, variant.startswith("two_way"), args.lora_rank if variant.endswith("lora") else 0,
                          args.steps, val_batches, args.num_workers, args.freeze_anchors, args.anchors, args.val_limit,
                          args.accelerator)
        rows.append({"variant": variant, **row})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "results"}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    print("| variant | configs | steps/config | trainable stitch params | anchors top-1 | best stitch | on front | > 1 pt below lower anchor | median gap (pts) | train s |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        anchors = " / ".join(f"{a:.1f}" for a in r["anchor_acc1"])
        print(f"| {r['variant']} | {r['configs']} | {r['steps_per_config']:.1f} | {r['trainable_stitch_params']} | {anchors} | "
              f"{r['best_stitch_acc1']:.1f} | {r['on_front']}/{r['stitches']} | {r['below_lower_anchor']} | {r['median_gap']:+.2f} | {r['train_s']} |")


if __name__ == "__main__":
    main()

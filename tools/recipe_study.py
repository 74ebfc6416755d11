"""One row of the recipe table: `snnet fit` a config with a recipe's overrides, bounded, and record
recipe, steps, wall time and the four front figures (snnet.front) in a JSONL file.

    python tools/recipe_study.py --config configs/cifar10_resnet.yaml --recipe frozen \
        --steps 300 --val-limit 2000 --set model.init_args.optim.freeze_anchors=true --out outputs/study/cifar.jsonl

``--set KEY=VALUE`` (dotted path into the YAML, VALUE parsed as YAML) may repeat; it is applied last
(``--set trainer.enable_checkpointing=true`` keeps checkpoints). Outputs go to ``--out-dir`` (default
``outputs/study/<config stem>/<recipe>/``); the row is appended to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from snnet.cli import main


def set_key(cfg: dict, dotted: str, value) -> None:
    node = cfg
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def study_config(config: Path, out_dir: Path, steps: int | None, val_limit: int | None, overrides: list[str]) -> dict:
    """The fit config with the recipe's overrides, its outputs redirected to ``out_dir``."""
    cfg = yaml.safe_load(config.read_text())
    trainer = cfg.setdefault("trainer", {})
    trainer["default_root_dir"] = str(out_dir)
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out_dir), "name": "logs"}}
    trainer["callbacks"] = [{"class_path": "snnet.callbacks.StitchReport", "init_args": {"out_dir": str(out_dir)}}]
    trainer["enable_checkpointing"] = False
    trainer["enable_progress_bar"] = False
    if steps is not None:  # one bounded epoch: validation (and the report) runs at its end
        trainer["max_epochs"], trainer["limit_train_batches"] = 1, steps
    if val_limit is not None:
        set_key(cfg, "data.init_args.val_limit", val_limit)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        set_key(cfg, key, yaml.safe_load(value))
    return cfg


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--recipe", required=True, help="row name")
    parser.add_argument("--steps", type=int, help="training steps (one epoch limited to this many batches); default: the config's epochs")
    parser.add_argument("--val-limit", type=int, help="fixed validation subset size")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("outputs/study/recipes.jsonl"))
    parser.add_argument("--out-dir", type=Path, help="the run's outputs (default outputs/study/<config stem>/<recipe>)")
    args = parser.parse_args()

    out_dir = args.out_dir or Path("outputs/study") / args.config.stem / args.recipe
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = study_config(args.config, out_dir, args.steps, args.val_limit, args.set)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    start = time.perf_counter()
    main(["fit", "--config", str(out_dir / "config.yaml")])
    wall = time.perf_counter() - start
    saved = json.loads((out_dir / "fit_results.json").read_text())
    row = {"config": str(args.config), "recipe": args.recipe, "steps": args.steps, "epochs": cfg["trainer"].get("max_epochs"),
           "val_limit": args.val_limit, "overrides": args.set, "wall_s": round(wall, 1), "figures": saved["figures"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))

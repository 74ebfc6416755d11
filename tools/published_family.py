"""A servable SN-Net whose per-stitch accuracies are the reference code's published ones.

The reference SN-Net's ImageNet-trained weights are not available offline, but its per-stitch
results are (``../shared/reference/published-results``). For work that needs a real network's
compute and a real accuracy per stitch, not trained weights (the serving benchmark: latency from
the forward, expected accuracy from the stitch mix), this writes

* ``network.ckpt``: an ``snnet fit``-style checkpoint of the same anchors (random weights,
  ``pretrained: false``), loadable by ``snnet serve`` / ``snnet export``;
* ``results.json``: our ids, names, FLOPs and parameters, with ``acc1``/``acc5`` from the published
  file, each published ``cfg_id`` matched to our id of the same index only after checking that the
  reference's fvcore multiply-adds agree with ours (within ``--flops-tolerance``).

    python tools/published_family.py --anchors resnet18 resnet50 \\
        --published ../shared/reference/published-results/snnet_resnet18_resnet50.jsonl --out outputs/published_r18_r50
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from snnet.sn_net.build import NetworkConfig  # noqa: E402
from snnet.front import front_figures, published_results  # noqa: E402
from snnet.sn_net.module import SNNetModule  # noqa: E402
from snnet.results import save_results  # noqa: E402


def published_rows(path: Path) -> dict[int, dict]:
    """cfg_id -> row of a published ``.jsonl`` file."""
    if not path.is_file():
        raise SystemExit(f"published results not found: {path} (see ../shared/reference/published-results/README.md)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["cfg_id"]): r for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchors", nargs="+", required=True, help="timm names, small to large, as the reference")
    parser.add_argument("--published", type=Path, required=True, help="a published .jsonl file")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--flops-tolerance", type=float, default=0.01, help="relative; fvcore and our counter differ slightly")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    module = SNNetModule(network=NetworkConfig(anchors=args.anchors, pretrained=False), distill={"teacher": None})
    try:
        results = published_results(module.net, published_rows(args.published), args.flops_tolerance)
    except ValueError as e:
        raise SystemExit(f"{args.published}: {e}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "network.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__, "global_step": 0, "epoch": 0}, ckpt)
    figures = front_figures(results)
    save_results(results, args.out / "results.json", figures=figures.to_dict())
    print(f"{ckpt}: {len(results)} configurations of {' + '.join(args.anchors)} (random weights); "
          f"{args.out / 'results.json'}: the published accuracies ({figures.summary()})")


if __name__ == "__main__":
    main()

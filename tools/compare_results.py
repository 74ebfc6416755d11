"""Before/after comparison of two results files (e.g. least-squares init vs trained): a Markdown
table with the change per stitch and a Pareto plot with both series.

    python tools/compare_results.py --before docs/results/cifar10_resnet_lsinit.json \\
        --after outputs/cifar10_resnet/fit_results.json --plot docs/results/cifar10_resnet_trained.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snnet.results import load_results, markdown_table, plot_pareto  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compare two snnet results files.")
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="write the two-series Pareto plot here")
    parser.add_argument("--title", default="top-1 vs GFLOPs: before and after training")
    parser.add_argument("--metric", default="acc1", choices=["acc1", "acc5"])
    args = parser.parse_args(argv)
    before, after = load_results(args.before), load_results(args.after)
    print(markdown_table(after, before=before, metric=args.metric))
    if args.plot:
        plot_pareto(after, args.plot, metric=args.metric, title=args.title, before=before)
        print(f"\nPareto plot: {args.plot}")


if __name__ == "__main__":
    main()

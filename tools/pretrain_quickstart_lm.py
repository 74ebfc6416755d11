"""Pretrain the LM quickstart's anchors (byte-level Llamas of widths 32/64/128 on the Python standard library's sources), offline."""
import argparse

from snnet.quickstart_lm import pretrain_lm_anchors

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default="outputs/quickstart_lm/anchors")
    parser.add_argument("--steps", type=int, default=200, help="training batches per anchor")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pretrain_lm_anchors(args.out_dir, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed)

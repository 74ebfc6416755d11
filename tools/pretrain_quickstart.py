"""Pretrain the quickstart anchors (cifar_resnet20 at widths 4/8/16 on distorted scikit-learn digits), offline."""
import argparse

from snnet.quickstart import QUICKSTART_ANCHORS, QUICKSTART_COPIES, QUICKSTART_DISTORTION, pretrain_anchors

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", default="outputs/quickstart/anchors")
    parser.add_argument("--anchors", nargs="+", default=list(QUICKSTART_ANCHORS))
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--distortion", type=float, default=QUICKSTART_DISTORTION, help="DigitsDataModule distortion (0: plain digits)")
    parser.add_argument("--copies", type=int, default=QUICKSTART_COPIES, help="DigitsDataModule copies (distorted views per digit)")
    args = parser.parse_args()
    pretrain_anchors(args.out_dir, args.anchors, args.image_size, args.epochs, args.lr, args.seed, args.distortion, args.copies,
                     args.batch_size)

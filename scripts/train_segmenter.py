"""Train a learned segmentation for a KTC2023 network (deepunroll/realdata/ktc_segmenter.py) and save both.

    python scripts/train_segmenter.py CHECKPOINT TARGET [--epochs 20] [--inputs sigma x0] [--seed 0]
                                      [--network-lr 1e-4] [--priors 0.05,0.03 0.5,0.115]

CHECKPOINT is a network trained on data=ktc2023_sim (a run's checkpoints/best.pt, or an exported model); the
network stays frozen and a small U-Net learns the three KTC classes from its output and the linearised x0 on the
simulated train split (cross-entropy, best validation loss kept). With ``--network-lr`` the network is trained on
with it, end to end for the labels; ``--priors`` adds, per prior_std,prior_length pair, the linearised
reconstruction of the measurements with that prior as an input image. TARGET gets the network's weights and config with the segmenter;
``scripts/ktc2023.py --model TARGET`` then labels with it (segmentation ``learned``).
"""

import argparse
import sys
from pathlib import Path

import torch

from deepunroll.realdata.ktc_segmenter import INPUTS, add_segmenter


def prior(text: str) -> tuple[float, float]:
    """'STD,LENGTH' -> (prior_std, prior_length), both positive."""
    try:
        std, length = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STD,LENGTH (two numbers, e.g. 0.05,0.03)") from None
    if not (std > 0 and length > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: prior std and length must be positive")
    return std, length


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="train_segmenter.py", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=INPUTS,
                        help="images the segmenter reads: the network's output (sigma) and / or the linearised x0")
    parser.add_argument("--grid", type=int, default=64, help="the segmenter's grid (pixels per side, divisible by 4)")
    parser.add_argument("--channels", type=int, default=32, help="the U-Net's first-level channels (multiple of 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--network-lr", type=float, default=None, help="train the network on with the segmenter at "
                        "this learning rate (end to end for the labels; needs the sigma input); default: frozen")
    parser.add_argument("--priors", nargs="+", type=prior, default=[], metavar="STD,LENGTH",
                        help="extra linearised reconstructions as inputs: prior std [S/m], correlation length [m] each "
                        "(needs a network trained at operator.level 1)")
    parser.add_argument("--data-root", default=None, help="the KTC2023 folder (its training/ref.mat), if the "
                        "checkpoint's operator.data_root does not point at it on this machine")
    parser.add_argument("--data-dir", default=None, help="where the simulated dataset is (or is generated)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {key: value for key, value in (("operator.data_root", args.data_root), ("data.root", args.data_dir))
                if value is not None}
    try:
        result = add_segmenter(args.checkpoint, args.target, args.inputs, args.grid, args.channels, args.epochs,
                               args.seed, settings, network_lr=args.network_lr, priors=args.priors)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error.args[0] if error.args else error}")
    best = result["provenance"]["segmenter"]["best_val_ce"]
    print(f"{args.target}: network of {args.checkpoint} with a segmenter (best validation cross-entropy {best:.4f})")


if __name__ == "__main__":
    main()

"""Whiten the image tokens a miniature student hands its language model (`stem_whitening`).

    python experiments/miniature/whiten_stem.py MODEL --data TRAIN_LABELS [--rel 0.01]

Same mean and total spread, every direction equally strong; labels (MOS) are not read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stem_whitening import WhiteningError, images_of, whiten_merger

from qponder_mlx.labels import LabelError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="a tiny model folder")
    ap.add_argument("--data", type=Path, required=True,
                    help="label file whose images to whiten over (the TRAIN split)")
    ap.add_argument("--rel", type=float, default=0.01,
                    help="keep the directions whose spread is above this fraction of the "
                         "strongest one")
    args = ap.parse_args(argv)
    try:
        record = whiten_merger(args.model, images_of(args.data), args.rel)
    except (LabelError, WhiteningError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.model}: image tokens whitened over {record['images']} images "
          f"({record['directions']} of {record['hidden']} directions kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

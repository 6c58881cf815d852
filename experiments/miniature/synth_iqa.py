"""Build the miniature's KADID-style set: CC0 photos × blur/noise/JPEG × 5 KADID levels.

    python experiments/miniature/synth_iqa.py OUT [--size 112] [--crops 16] [--test-crops 8]

Labelled with KADID-10k's mean MOS per (type, level) (`synth.LEVEL_MOS`); writes labels.jsonl,
train.jsonl and test.jsonl (and test_crops.jsonl with --test-crops). Needs scikit-image (its
CC0 photos): `pip install 'qponder-mlx[bench]'`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from synth import (
    CC0_PHOTOS,
    center_crop,
    crop_view,
    load_cc0_photo,
    random_crops,
    view_seed,
    write_set,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="folder for the images and label files")
    ap.add_argument("--size", type=int, default=224, help="centre-crop side in pixels")
    ap.add_argument("--photos", default=",".join(sorted(CC0_PHOTOS)),
                    help="comma-separated scikit-image CC0 photos to use")
    ap.add_argument("--test-photos", default="coffee,rocket,grass",
                    help="photos held out for test.jsonl (no photo in both)")
    ap.add_argument("--seed", type=int, default=0, help="noise and crop seed")
    ap.add_argument("--crops", type=int, default=0,
                    help="also N random crops (scale, place, flip) of every TRAIN photo")
    ap.add_argument("--test-crops", type=int, default=0,
                    help="also N random crops of every TEST photo, in test_crops.jsonl")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.photos.split(",") if n.strip()]
    held = {n.strip() for n in args.test_photos.split(",") if n.strip()}
    unknown = sorted(set(names) - set(CC0_PHOTOS)) + sorted(held - set(names))
    if unknown:
        print(f"error: --photos/--test-photos: unknown or unused photo(s) {unknown}; "
              f"choose from {sorted(CC0_PHOTOS)}", file=sys.stderr)
        return 2
    try:
        photos = {n: load_cc0_photo(n) for n in names}
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    refs = {n: center_crop(im, args.size) for n, im in photos.items()}
    photo_of = {n: n for n in names}
    split = {n: "test" if n in held else "train" for n in names}
    for n in names:
        count = args.test_crops if n in held else args.crops
        for c, im in enumerate(random_crops(photos[n], args.size, count,
                                            seed=view_seed(args.seed, n))):
            view = crop_view(n, c)
            refs[view], photo_of[view] = im, n
            if n in held:
                split[view] = "test_crops"
    items = write_set(args.out, refs, split=split, seed=args.seed, photo_of=photo_of)
    n_train = sum(split[i.reference] == "train" for i in items)
    print(f"{len(items)} images in {args.out} ({n_train} train, {len(items) - n_train} test"
          + (" incl. test_crops.jsonl)" if args.test_crops else ")"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

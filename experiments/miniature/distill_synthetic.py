"""Distil the miniature's cold-start set from the synthetic stand-in teacher.

    python experiments/miniature/distill_synthetic.py --data TRAIN --out OUT.jsonl \
        [--samples-per-image 2] [--temperature 0.7] [--max-score-error 0.5] [--bias ...] [--coarse]

The stand-in (`synthetic_teacher.SyntheticTeacher`) implements the product's `Teacher`
interface, so everything else — attempts, agreement filter, files, resume — is the product's
`run_distill`, as for a real teacher.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from synthetic_teacher import SyntheticTeacher, parse_bias

from qponder_mlx.distill import DistillConfig, DistillError, headline, run_distill
from qponder_mlx.labels import LabelError, read_labels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a synth_iqa.py label file")
    ap.add_argument("--out", type=Path, required=True, help="kept rows (SFT JSONL)")
    ap.add_argument("--labels", type=Path, default=None,
                    help="the set's labels.jsonl (default: the one beside each image's folder)")
    ap.add_argument("--samples-per-image", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.7,
                    help="score noise SD 0.35*T, level misread 0.15*T")
    ap.add_argument("--max-score-error", type=float, default=0.5)
    ap.add_argument("--bias", default="",
                    help='offsets of its scores per distortion type, e.g. "noise=+0.5,jpeg=+0.4"')
    ap.add_argument("--coarse", action="store_true",
                    help="a teacher that tells apart 3 severities per distortion, not 5")
    args = ap.parse_args(argv)
    try:
        parse_bias(args.bias)
        samples, problems = read_labels(args.data)
        # in the try: a --labels file it cannot read is a one-line error too
        teacher = SyntheticTeacher(args.labels, temperature=args.temperature, bias=args.bias,
                                   coarse=args.coarse)
    except (ValueError, LabelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # "local": an in-process teacher; its name in every row is the stand-in's own.
    cfg = DistillConfig(teacher="local", teacher_model=teacher.model,
                        samples_per_image=args.samples_per_image, temperature=args.temperature,
                        max_score_error=args.max_score_error)
    try:
        result = run_distill(samples, teacher, cfg, args.out)
    except DistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    new = result.new
    print(f"this run: kept {new['kept']}, rejected {new['rejected']}, failed {new['failed']}")
    print(headline(result.summary))
    print(f"kept: {result.out}\nsummary: {result.summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

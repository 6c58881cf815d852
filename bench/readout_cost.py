"""What the expected read-out costs: reason-mode scoring with `readout="expected"` vs `"text"`.

Same process, same images, same greedy decode; the two read-outs alternate for --repeats rounds
(after one untimed warm-up each), so a machine that gets busier mid-run affects both. The expected
read-out adds a gather of the ten digit log-probs per decode step. Default: a random tiny
Qwen2.5-VL (LM 128 x 2; it never closes its answer, so every
row decodes the full --max-tokens budget: the worst case for a per-step cost).

    . scripts/blas_env.sh; .venv/bin/python bench/readout_cost.py            # ~2 min
    .venv/bin/python bench/readout_cost.py --model runs/repro_s0/student_base \\
        --adapter runs/repro_s0/grpo/adapters --images-from runs/repro_s0/data/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from timing import result, run_main  # noqa: E402

from qponder_mlx.generate import SamplingConfig  # noqa: E402
from qponder_mlx.images import PixelPolicy  # noqa: E402
from qponder_mlx.model import load_model  # noqa: E402
from qponder_mlx.scoring import ScoreConfig, Scorer  # noqa: E402
from qponder_mlx.testing import build_tiny_model  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "qponder_mlx" / "assets" / "cc0_mini" / "images"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: a random tiny one)")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--images-from", type=Path, default=None,
                    help="a label JSONL whose images are scored (default: the bundled CC0 set)")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pixels", type=int, default=112 * 112)
    args = ap.parse_args(argv)

    if args.images_from:
        rows = [json.loads(x) for x in args.images_from.read_text().splitlines() if x.strip()]
        paths = [args.images_from.parent / r["image"] for r in rows]
    else:
        paths = sorted(ASSETS.iterdir())
    paths = (paths * (args.images // len(paths) + 1))[:args.images]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_tiny_model(Path(tmp) / "m", hidden_size=128, seed=0))
        loaded = load_model(model, args.adapter)
        px = PixelPolicy(min_pixels=args.pixels, max_pixels=args.pixels)
        scorers = {r: Scorer(loaded, ScoreConfig(
            batch_size=args.batch_size, pixels=px, readout=r,
            sampling=SamplingConfig(max_tokens=args.max_tokens))) for r in ("text", "expected")}
        times: dict[str, list[float]] = {r: [] for r in scorers}
        for s in scorers.values():  # warm-up: compile, caches
            s.score(paths[:args.batch_size])
        for _ in range(args.repeats):
            for r, s in scorers.items():
                t0 = time.perf_counter()
                out = s.score(paths)
                times[r].append(time.perf_counter() - t0)
                tokens = sum(x.tokens for x in out)
    med = {r: statistics.median(t) for r, t in times.items()}
    for r, t in times.items():
        print(f"{r:9s} {len(paths)} images, {tokens} tokens/run: "
              + " ".join(f"{x:.2f}" for x in t) + f" s (median {med[r]:.2f})")
    result("readout_expected_time_ratio", med["expected"] / med["text"], 1.05, ".3f")
    return 0


if __name__ == "__main__":
    run_main(main)

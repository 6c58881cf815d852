"""The consistency judge's cost per GRPO step: shared head (run once) vs every row whole.

`blind_scores_vlm` re-scores a step's B·G reasonings blind. Every row starts with the same chat
template and judge prompt; with `share_prefix` that head runs once and its keys/values are
repeated for all rows. Same process, same reasonings (short expert-style assessments), the
modes alternate for --repeats rounds after one untimed warm-up each; the scores of the two modes
are compared as well. A third mode, the shared head without the
decimal read (judge-v1, `decimals=False`), prices the decimal read (judge-v2's two extra tokens
per row on the first pass's cache).

    . scripts/blas_env.sh; .venv/bin/python bench/judge_speed.py        # ~15 s
    .venv/bin/python bench/judge_speed.py --model runs/s1/student_base \\
        --adapter runs/s1/sft/adapters
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from timing import result, run_main  # noqa: E402

from qponder_mlx.grpo.judge import blind_scores_vlm  # noqa: E402
from qponder_mlx.model import load_model  # noqa: E402
from qponder_mlx.testing import build_tiny_model  # noqa: E402

# Short expert-style assessments of the length a cold-started student writes (~40 tokens).
_PARTS = {
    "focus": ["Focus is sharp on the subject.", "Edges are slightly soft.",
              "Strong blur smears every edge and texture."],
    "noise": ["Noise is low.", "Fine grain is visible in the shadows.",
              "Heavy noise covers flat areas."],
    "compression": ["No compression artifacts.", "Mild blocking around edges.",
                    "Severe JPEG blocking and ringing."],
    "exposure": ["Exposure is balanced.", "Highlights are slightly clipped."],
}


def reasoning(rng: random.Random) -> str:
    return " ".join(rng.choice(v) for v in _PARTS.values()) + " Overall quality follows."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None,
                    help="model folder (default: a random tiny one, LM 256 x 2)")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--rows", type=int, default=64, help="reasonings per call (B·G)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    rng = random.Random(0)
    texts = [reasoning(rng) for _ in range(args.rows)]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_tiny_model(Path(tmp) / "m", hidden_size=256, seed=0))
        loaded = load_model(model, args.adapter)
        m, tok = loaded.model, loaded.tokenizer
        # mode -> (share_prefix, decimals)
        modes = {"whole": (False, True), "shared": (True, True), "lead-only": (True, False)}

        def judge(mode: str) -> np.ndarray:
            share, dec = modes[mode]
            return blind_scores_vlm(m, tok, texts, share_prefix=share, decimals=dec)

        scores = {k: judge(k) for k in modes}
        times: dict[str, list[float]] = {k: [] for k in modes}
        for _ in range(args.repeats):
            for k in modes:
                t0 = time.perf_counter()
                judge(k)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    for k, t in times.items():
        print(f"{k:9s} {args.rows} rows: " + " ".join(f"{x:.3f}" for x in t)
              + f" s (median {med[k]:.3f})")
    diff = float(np.max(np.abs(scores["whole"] - scores["shared"])))
    print(f"max |score difference| between the modes: {diff:.2e}")
    result("judge_shared_prefix_speedup", med["whole"] / med["shared"], 1.5)
    result("judge_score_max_abs_diff", diff, "1e-4", ".1e")
    # The decimal read's price: judge-v2 time over judge-v1 time, both with the shared head.
    result("judge_decimal_read_cost", med["shared"] / med["lead-only"], 1.3)
    return 0


if __name__ == "__main__":
    run_main(main)

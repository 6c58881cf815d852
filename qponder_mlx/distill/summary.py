"""The summary of a distillation: counts, why samples were dropped, teacher vs MOS, tokens.

Computed from the two output files rather than from one run's memory, so a run that resumed
after a crash reports the whole set.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from qponder_mlx import metrics
from qponder_mlx.io import read_jsonl


def _agreement(pred: list[float], mos: list[float]) -> dict:
    n = len(pred)
    if n < 2:
        return {"n": n, "srcc": None, "plcc": None, "mae": None}

    def clean(x: float) -> float | None:  # NaN (constant input) is not valid JSON
        return None if math.isnan(x) else round(x, 4)

    return {"n": n, "srcc": clean(metrics.srcc(pred, mos)), "plcc": clean(metrics.plcc(pred, mos)),
            "mae": clean(metrics.mae(pred, mos))}


def summarize(out: Path, rejected: Path) -> dict:
    """Counts by status and reason code, teacher SRCC/PLCC/MAE vs MOS, tokens spent.

    `teacher_vs_mos` takes every sample the teacher scored at all (kept or not; the mean of its
    attempts' scores): how good the teacher is. `kept_vs_mos` takes the kept answers only: how
    faithful the SFT set is (high by construction; a sanity check, not a teacher quality).
    """
    kept = list(read_jsonl(out))
    dropped = list(read_jsonl(rejected))
    status = Counter(r.get("status", "rejected") for r in dropped)
    rows = kept + dropped
    scored = [r for r in rows if r.get("teacher_scores")]
    mean_scores = [sum(r["teacher_scores"]) / len(r["teacher_scores"]) for r in scored]
    tokens = {k: sum(r.get("tokens_spent", {}).get(k, 0) for r in rows)
              for k in ("prompt", "completion")}
    return {
        "total": len(rows),
        "kept": len(kept),
        "rejected": status["rejected"],
        "failed": status["failed"],
        "reasons": dict(Counter(r.get("code") or "unknown" for r in dropped).most_common()),
        "teacher_vs_mos": _agreement(mean_scores, [r["mos"] for r in scored]),
        "kept_vs_mos": _agreement([r["teacher_score"] for r in kept], [r["mos"] for r in kept]),
        "tokens": {**tokens, "total": tokens["prompt"] + tokens["completion"]},
    }


def headline(summary: dict) -> str:
    def corr(block: dict) -> str:
        def num(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.3f}"

        return (f"SRCC {num(block['srcc'])} PLCC {num(block['plcc'])} MAE {num(block['mae'])} "
                f"(n={block['n']})")

    reasons = ", ".join(f"{k} {v}" for k, v in summary["reasons"].items()) or "none"
    t = summary["tokens"]
    return (f"kept {summary['kept']}  rejected {summary['rejected']}  failed {summary['failed']}  "
            f"of {summary['total']}\n"
            f"dropped because: {reasons}\n"
            f"teacher vs MOS: {corr(summary['teacher_vs_mos'])}; kept answers: "
            f"{corr(summary['kept_vs_mos'])}\n"
            f"tokens: {t['prompt']:,} prompt + {t['completion']:,} completion = {t['total']:,}")

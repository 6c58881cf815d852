"""Fast mode's two read-outs side by side on one student (History CG in LOG.md).

Fast mode asks for the answer right after `<think></think><answer>` and reads the digit
probabilities there. Read at the leading digit only, E[d] floors every score the model means as
d.x (an intended 3.7 reads ~3.0); reading the first decimal too — the most likely leading digit
and the dot appended, then E[decimal]/10 added, as the GRPO judge reads a reasoning's implied
score — keeps the distances. Both reads come from the same forward passes: the product's prefill
(the leading digit, what `qponder score --mode fast` reads), then the prompt with "d." appended
run again for the decimal (`fast_digits`; the run at History CG read it with two decode steps on
the prefill's cache, the same numbers up to float rounding).

    python experiments/miniature/fast_readout.py RUN [RUN ...]
    python experiments/miniature/fast_readout.py --mean RUN [RUN ...]   # the mean over runs

RUN is a `reproduce.py` output folder (its student_base, sft/adapters and data). Writes
RUN/eval/fast_readout.json and prints SRCC and MAE of both reads next to reason mode's (from the
run's own eval reports) on the held-out centre views and all held-out views.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from qponder_mlx import generate as gen
from qponder_mlx import metrics
from qponder_mlx.images import PixelPolicy, load_image
from qponder_mlx.io import atomic_write_json, read_jsonl
from qponder_mlx.model import load_model
from qponder_mlx.readout import digit_probs, digits_value, single_token_ids
from qponder_mlx.scoring import ScoreConfig, Scorer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import eval_scores  # noqa: E402

SPLITS = {"test": "centre views", "held_out_views": "all views"}


def fast_digits(model, inputs: gen.Inputs, prefix: gen.PrefixCache, digit_ids: list[int],
                dot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The leading digit's probabilities (B, 5) after the answer prefix, then the first
    decimal's (B, 10) with the most likely leading digit and the dot appended to each row."""
    lead = digit_probs(gen.prefill_logits(model, inputs, prefix), digit_ids[1:6])
    tail = mx.array([[digit_ids[int(d) + 1], dot_id] for d in lead.argmax(-1)])
    longer = {**inputs, "input_ids": mx.concatenate(
        [inputs["input_ids"], tail.astype(inputs["input_ids"].dtype)], axis=1)}
    return lead, digit_probs(gen.prefill_logits(model, longer, prefix), digit_ids)


def fast_reads(run: Path, split: str, size: int, batch: int = 16) -> dict[str, list[float]]:
    loaded = load_model(str(run / "student_base"), str(run / "sft" / "adapters"))
    px = PixelPolicy(min_pixels=size * size, max_pixels=size * size)
    scorer = Scorer(loaded, ScoreConfig(mode="fast", pixels=px))
    *digits, dot = single_token_ids(loaded.tokenizer, "0123456789.", "the decimal read")
    rows = list(read_jsonl(run / "data" / f"{split}.jsonl"))
    lead_only, with_decimal = [], []
    for s in range(0, len(rows), batch):
        imgs = [px.resize(load_image(run / "data" / r["image"]).convert("RGB"))
                for r in rows[s:s + batch]]
        inputs = gen.encode(loaded.processor, [scorer.prompt] * len(imgs), imgs)
        lead, dec = fast_digits(loaded.model, inputs, scorer.prefix, digits, dot)
        lead_only += digits_value(lead).tolist()
        with_decimal += digits_value(lead, [dec]).tolist()
    return {"mos": [float(r["mos"]) for r in rows], "lead": lead_only, "decimal": with_decimal}


def reason_scores(run: Path, split: str) -> tuple[list[float], list[float]]:
    """MOS and the written score of reason mode's eval report (the rows it answered)."""
    name = "sft_reason.json" if split == "test" else f"sft_reason_{split}.json"
    report = json.loads((run / "eval" / name).read_text())
    rows = list(read_jsonl(run / "data" / f"{split}.jsonl"))
    pred = eval_scores(report, [r["id"] for r in rows], "text")
    pairs = [(float(r["mos"]), p) for r, p in zip(rows, pred) if p is not None]
    return [m for m, _ in pairs], [p for _, p in pairs]


def summary(mos: list[float], pred: list[float]) -> dict[str, float | None]:
    """SRCC and MAE (None when under two answers: a toy student that never closes its answer)."""
    if len(pred) < 2:
        return {"srcc": None, "mae": None, "n": len(pred)}
    return {"srcc": round(metrics.srcc(pred, mos), 4), "mae": round(metrics.mae(pred, mos), 4),
            "n": len(pred)}


def mean_table(runs: list[Path]) -> None:
    """The mean over runs of each read's SRCC and MAE, and fast MAE / reason MAE."""
    reports = [json.loads((r / "eval" / "fast_readout.json").read_text()) for r in runs]
    for split, label in SPLITS.items():
        def mean(read, key, split=split):
            return sum(rep[split][read][key] for rep in reports) / len(reports)
        cells = "; ".join(f"{read} SRCC {mean(read, 'srcc'):.4f} MAE {mean(read, 'mae'):.4f}"
                          for read in ("reason", "fast_lead", "fast_decimal"))
        print(f"mean of {len(runs)} runs, {label}: {cells}; fast decimal MAE / reason MAE "
              f"{mean('fast_decimal', 'mae') / mean('reason', 'mae'):.2f}")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--mean":
        mean_table([Path(a) for a in argv[1:]])
        return 0
    for run in map(Path, argv):
        size = json.loads((run / "sft_results.json").read_text())["config"]["data"]["size"]
        out = {}
        for split, label in SPLITS.items():
            reads = fast_reads(run, split, size)
            out[split] = {"reason": summary(*reason_scores(run, split)),
                          "fast_lead": summary(reads["mos"], reads["lead"]),
                          "fast_decimal": summary(reads["mos"], reads["decimal"])}
            r = out[split]
            ratio = (r["fast_decimal"]["mae"] / r["reason"]["mae"]) if r["reason"]["mae"] else None
            print(f"{run} {label}: reason {r['reason']} | fast lead {r['fast_lead']} | "
                  f"fast decimal {r['fast_decimal']} | MAE ratio {ratio}", flush=True)
        atomic_write_json(run / "eval" / "fast_readout.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

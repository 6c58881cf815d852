"""How high can any read-out of the student's image tokens rank the held-out views?

    source scripts/blas_env.sh
    .venv/bin/python bench/readout_ceiling.py --run runs/whl_s4

The students answer from what their vision tower hands the language model. This fits a sweep of
read-outs on the training views' image tokens (the merger output averaged per image, as
`bench/stem_probe.py`) and scores both held-out sets (45 centre views, 405 views):

- ridge and kNN means of the MOS (stem_probe's `readouts`),
- linear softmax class probes (`softmax_probe`, l2 1e-4 / 1e-3 / 1e-2) and one-hidden-layer MLP
  class probes (`mlp_probe`, 64 / 256 units), each read two ways: the MOS of the picked class
  (argmax, as the students' written answers) and the probability-weighted MOS (expected, as
  the students' expected read-out).

The best of them is picked *on the held-out set itself*, so it is an optimistic estimate of what
the image tokens allow, not a bound. Set beside the run's SFT student it says whether the GRPO
goal of the reproduction (GRPO ≥ SFT + 0.03, docs/reproduction.md) asks for more rank order
than any of these read-outs finds in the tokens. Ends with `RESULT readout_ceiling_srcc<set>
<best> goal <SFT + 0.03>` per held-out set.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import stem_probe as sp  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

SETS = {"": "test", "_all_views": "held_out_views"}   # RESULT suffix -> label file
SFT_ROW = {"": "Q-Ponder-CI (SFT), reason", "_all_views": "Q-Ponder-CI (SFT), reason, all views"}
GRPO_GAIN = 0.03


def class_probes(ztr: np.ndarray, ctr: np.ndarray, n_classes: int) -> dict[str, object]:
    """name -> map from standardised features to class probabilities."""
    probes = {}
    for l2 in (1e-4, 1e-3, 1e-2):
        w, b = sp.softmax_probe(ztr, ctr, n_classes, l2=l2)
        probes[f"linear l2={l2:g}"] = (lambda z, w=w, b=b: sp.softmax(z @ w + b))
    for hidden in (64, 256):
        probes[f"mlp {hidden}"] = sp.mlp_probe(ztr, ctr, n_classes, hidden=hidden)
    return probes


def sweep(xtr: np.ndarray, tr: list, tests: dict[str, tuple[np.ndarray, list]]
          ) -> dict[str, dict[str, float]]:
    """{held-out set: {read-out: SRCC}} for every read-out of the sweep."""
    ytr = np.array([r["mos"] for r in tr])
    classes, mos, ctr = sp.level_classes(tr)
    z = sp.standardiser(xtr)
    probes = class_probes(z(xtr), ctr, len(classes))
    out = {}
    for name, (xte, te) in tests.items():
        yte = np.array([r["mos"] for r in te])
        preds = sp.readouts(xtr, ytr, xte)
        for probe_name, probe in probes.items():
            p = probe(z(xte))
            preds[f"{probe_name} argmax"] = mos[p.argmax(1)]
            preds[f"{probe_name} expected"] = p @ mos
        out[name] = {k: float(spearmanr(v, yte)[0]) for k, v in preds.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True,
                    help="a bench/reproduce.py folder (student_base, data, results.json)")
    args = ap.parse_args(argv)
    results = json.loads((args.run / "results.json").read_text())
    feats = sp.tower_features(args.run / "student_base", args.run / "data",
                              ["train", *SETS.values()])
    (xtr, tr), tests = feats[0], dict(zip(SETS, feats[1:]))
    table = sweep(xtr, tr, tests)
    names = list(table[""])
    print(f"{'read-out':28s} {'centre':>8s} {'all':>8s}")
    for k in names:
        print(f"{k:28s} " + " ".join(f"{table[s][k]:8.3f}" for s in SETS))
    lines = []
    for s in SETS:
        best = max(table[s], key=table[s].get)
        sft = results["rows"][SFT_ROW[s]]["agreement"]["pooled"]["srcc"]
        print(f"{SETS[s]}: best read-out {best} {table[s][best]:.3f}; SFT student {sft:.3f}, "
              f"GRPO goal SFT + {GRPO_GAIN} = {sft + GRPO_GAIN:.3f}")
        lines.append(f"RESULT readout_ceiling_srcc{s} {table[s][best]:.3f} goal "
                     f"{sft + GRPO_GAIN:.3f}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

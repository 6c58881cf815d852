"""Summarise `bench/reproduce.py` runs made with different `--seed`s: the goals per seed, mean,
SD and worst case — one run's SRCC moves by a few hundredths with the seed, so a goal is read off
the mean and the spread, not off one run.

    .venv/bin/python bench/repro_seeds.py runs/repro_s0 runs/repro_s1 runs/repro_s2 \
        --out docs/repro_seeds.md

Prints a markdown table (and writes it with --out), then one RESULT line per goal and held-out
set with the mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import ALL_VIEWS, GOALS  # noqa: E402

# (results.json headline key, row-name suffix, label in the table, RESULT suffix)
SETS = [("headline", "", "45 centre views", ""),
        ("headline_all_views", ALL_VIEWS, "405 views", "_all_views")]
MEASURES = [("grpo_srcc", "srcc", "GRPO SRCC"), ("grpo_minus_sft_srcc", "grpo_minus_sft",
                                                 "GRPO − SFT"),
            ("grpo_minus_brisque_srcc", "grpo_minus_brisque", "GRPO − BRISQUE")]


def srcc(results: dict, row: str) -> float | None:
    return results["rows"].get(row, {}).get("agreement", {}).get("pooled", {}).get("srcc")


def load(run: Path) -> dict:
    path = run / "results.json"
    if not path.exists():
        raise SystemExit(f"error: {path} is missing — run bench/reproduce.py --out {run} first")
    results = json.loads(path.read_text())
    results["seed"] = results["config"]["student"]["seed"]
    return results


def summary(runs: list[dict]) -> tuple[str, list[str]]:
    """The markdown table and the RESULT lines."""
    head = ["held-out set", "measure", *[f"seed {r['seed']}" for r in runs], "mean", "SD", "worst",
            "goal", "mean meets it", "seeds meeting it"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    results = []
    for key, suffix, label, tag in SETS:
        if not all(key in r for r in runs):
            continue
        rows = [("SFT SRCC", [srcc(r, f"Q-Ponder-CI (SFT), reason{suffix}") for r in runs],
                 None, ""),
                ("BRISQUE SRCC", [srcc(r, f"BRISQUE{suffix}") for r in runs], None, "")]
        rows += [(name, [r[key][k] for r in runs], GOALS[goal], f"repro_{k}{tag}")
                 for k, goal, name in MEASURES]
        for name, vals, goal, measure in rows:
            if any(v is None for v in vals):
                continue
            v = np.array(vals, dtype=float)
            sd = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
            cells = [label, name, *[f"{x:.3f}" for x in v], f"{v.mean():.3f}", f"{sd:.3f}"]
            if goal is None:
                cells += ["", "", "", ""]
            else:
                cells += [f"{v.min():.3f}", f"≥ {goal}", "yes" if v.mean() >= goal else "no",
                          f"{int((v >= goal).sum())} of {len(v)}"]
                results.append(f"RESULT {measure}_seed_mean {v.mean():.4f} goal {goal}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="reproduce.py --out folders")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    runs = [load(r) for r in args.runs]
    table, results = summary(runs)
    if args.out:
        args.out.write_text(table)
    print(table)
    for line in results:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

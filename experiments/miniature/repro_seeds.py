"""Summarise `reproduce.py` runs made with different `--seed`s: the goals per seed, mean,
SD and worst case — one run's SRCC moves by a few hundredths with the seed, so a goal is read off
the mean and the spread, not off one run.

    .venv/bin/python experiments/miniature/repro_seeds.py runs/repro_s0 runs/repro_s1 \
        --out docs/repro_seeds.md

Prints a markdown table (and writes it with --out), then one RESULT line per goal and held-out
set with the mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from qponder_mlx.metrics import srcc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import (  # noqa: E402
    ALL_VIEWS,
    GOALS,
    LAST_STEP,
    expected_row,
    pooled,
    report_scores,
)

# (results.json headline key, row-name suffix, label in the table, RESULT suffix, read-out)
SETS = [("headline", "", "45 centre views", "", "text"),
        ("headline_all_views", ALL_VIEWS, "405 views", "_all_views", "text"),
        ("headline_expected", "", "45 centre views, expected read-out", "_expected_readout",
         "expected"),
        ("headline_all_views_expected", ALL_VIEWS, "405 views, expected read-out",
         "_all_views_expected_readout", "expected")]
GOAL_MEASURES = {"GRPO SRCC": ("grpo_srcc", "srcc"),
                 "GRPO − SFT SRCC": ("grpo_minus_sft_srcc", "grpo_minus_sft"),
                 "GRPO − BRISQUE SRCC": ("grpo_minus_brisque_srcc", "grpo_minus_brisque")}
# the last step's weights appear only in runs with GRPO weight averaging (rows missing in any
# run are left out of the table)
STUDENTS = [("SFT", "Q-Ponder-CI (SFT), reason"), ("GRPO", "Q-Ponder (GRPO), reason"),
            ("GRPO last step", f"{LAST_STEP}, reason")]


def load(run: Path) -> dict:
    path = run / "results.json"
    if not path.exists():
        raise SystemExit(f"error: {path} is missing — run reproduce.py --out {run} first")
    results = json.loads(path.read_text())
    results["seed"] = results["config"]["student"]["seed"]
    results["dir"] = run
    return results


def measures(r: dict, key: str, suffix: str,
             readout: str = "text") -> list[tuple[str, float | None]]:
    """(name, value) of one run on one held-out set: the goals first, then what explains them."""
    def row_of(student_row: str) -> str:
        name = student_row + suffix
        return name if readout == "text" else expected_row(name)

    out = [(name, r[key][k]) for name, (k, _) in GOAL_MEASURES.items()]
    out += [(f"{who} SRCC", pooled(r["rows"], row_of(row))) for who, row in STUDENTS]
    out.append(("BRISQUE SRCC", pooled(r["rows"], f"BRISQUE{suffix}")))
    for stat, get in (("PLCC", lambda row: pooled(r["rows"], row, "plcc")),
                      ("MAE", lambda row: r["rows"].get(row, {}).get("mae")),
                      ("distinct answers",
                       lambda row: r["rows"].get(row, {}).get("distinct_answers"))):
        out += [(f"{who} {stat}", get(row_of(row))) for who, row in STUDENTS]
    return out


def summary(runs: list[dict]) -> tuple[str, list[str]]:
    """The markdown table and the RESULT lines (means over seeds of the goal measures)."""
    head = ["held-out set", "measure", *[f"seed {r['seed']}" for r in runs], "mean", "SD", "worst",
            "goal", "mean meets it", "seeds meeting it"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    results = []
    for key, suffix, label, tag, readout in SETS:
        if not all(key in r for r in runs):
            continue
        per_run = [dict(measures(r, key, suffix, readout)) for r in runs]
        for name in per_run[0]:
            vals = [m[name] for m in per_run]
            if any(v is None for v in vals):
                continue
            v = np.array(vals, dtype=float)
            sd = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
            digits = 0 if name.endswith("distinct answers") else 3
            cells = [label, name, *[f"{x:.{digits}f}" for x in v], f"{v.mean():.{digits}f}",
                     f"{sd:.{digits}f}"]
            if name in GOAL_MEASURES:
                k, goal_key = GOAL_MEASURES[name]
                goal = GOALS[goal_key]
                cells += [f"{v.min():.3f}", f"≥ {goal}", "yes" if v.mean() >= goal else "no",
                          f"{int((v >= goal).sum())} of {len(v)}"]
                results.append(f"RESULT repro_{k}{tag}_seed_mean {v.mean():.4f} goal {goal}")
            else:
                cells += ["", "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", results


def held_out_answers(runs: list[dict]):
    """(seed, "SFT" | "GRPO", eval report, written score per id) for every run and student that
    has a reason-mode eval of all views of the held-out photos."""
    for run in runs:
        for st, name in (("sft", "SFT"), ("grpo", "GRPO")):
            path = run["dir"] / "eval" / f"{st}_reason_held_out_views.json"
            if path.exists():
                report = json.loads(path.read_text())
                yield run["seed"], name, report, report_scores(report, "text")


def answers_table(answers: list, photos: list[str]) -> str:
    """Per seed and student, on all views of the held-out photos: SRCC per photo, the share of
    answers whose first decimal is 3, and the most frequent answers — the ties GRPO makes
    (the numbers written, the paper's read-out)."""
    lines = ["| seed | student | " + " | ".join(photos) + " | first decimal 3 | top answers |",
             "|" + "---|" * (len(photos) + 4)]
    for seed, name, report, written in answers:
        answered = [(written[x["id"]], x["mos"], x["id"]) for x in report["samples"]
                    if written[x["id"]] is not None]
        cells = []
        for photo in photos:
            mine = [(v, m) for v, m, i in answered if i.startswith(photo + "_")]
            s = srcc(*zip(*mine)) if len(mine) >= 2 else None
            cells.append("–" if s is None or np.isnan(s) else f"{s:.3f}")
        scores = [v for v, _, _ in answered]
        d3 = np.mean([f"{v:.2f}"[2] == "3" for v in scores]) if scores else float("nan")
        top = ", ".join(f"{v:.2f} ({n})" for v, n in Counter(scores).most_common(4))
        lines.append(f"| {seed} | {name} | " + " | ".join(cells) + f" | {d3:.0%} | {top} |")
    return "\n".join(lines) + "\n"


def level_of(sample_id: str) -> tuple[str, int] | None:
    """(distortion, level) from a synth_iqa.py image id `<view>_<type>_<level>`."""
    parts = sample_id.rsplit("_", 2)
    return (parts[1], int(parts[2])) if len(parts) == 3 and parts[2].isdigit() else None


def answers_by_level(report: dict, written: dict) -> list[tuple[tuple[str, int], float, float]]:
    """((distortion, level), MOS, written answer) for every answered synth_iqa.py row."""
    out = []
    for x in report["samples"]:
        level = level_of(x["id"])
        if level is not None and written[x["id"]] is not None:
            out.append((level, float(x["mos"]), float(written[x["id"]])))
    return out


def levels_table(answers: list) -> str:
    """Per seed and student, on all views of the held-out photos: the mean written answer per
    (distortion, level), under the level's MOS — which levels a student tells apart, which it
    answers alike (e.g. three JPEG levels all at 4.3) and which it moves to the wrong side of
    another level."""
    cells: dict[tuple[int, str], dict] = {}
    mos: dict[tuple[str, int], float] = {}
    for seed, name, report, written in answers:
        per: dict[tuple[str, int], list[float]] = {}
        for level, m, answer in answers_by_level(report, written):
            mos[level] = m
            per.setdefault(level, []).append(answer)
        cells[(seed, name)] = {k: float(np.mean(v)) for k, v in per.items()}
    if not cells:
        return ""
    levels = sorted(mos)
    lines = ["| seed | student | " + " | ".join(f"{t} {lv} (MOS {mos[(t, lv)]:.2f})"
                                               for t, lv in levels) + " |",
             "|" + "---|" * (len(levels) + 2)]
    for (seed, name), means in cells.items():
        lines.append(f"| {seed} | {name} | " + " | ".join(
            f"{means[k]:.2f}" if k in means else "–" for k in levels) + " |")
    return "\n".join(lines) + "\n"


def type_offsets(rows: list[tuple[tuple[str, int], float, float]]) -> dict[str, float]:
    """Mean signed error (answer − MOS) per distortion type."""
    per: dict[str, list[float]] = {}
    for (kind, _), m, answer in rows:
        per.setdefault(kind, []).append(answer - m)
    return {k: float(np.mean(v)) for k, v in sorted(per.items())}


def offsets_table(answers: list) -> str:
    """Per seed and student, on all views of the held-out photos: how far the answers sit from
    the MOS per distortion type (a teacher's miscalibration that reached the student, History
    AX), and the SRCC with each type's mean offset taken out — the rank order that offsets cost
    (SRCC minus it is what removing them would gain)."""
    cells = []
    for seed, name, report, written in answers:
        rows = answers_by_level(report, written)
        if len(rows) >= 2:
            off = type_offsets(rows)
            mos = [m for _, m, _ in rows]
            cells.append((seed, name, off, srcc([a for _, _, a in rows], mos),
                          srcc([a - off[kind] for (kind, _), _, a in rows], mos)))
    if not cells:
        return ""
    kinds = sorted({k for _, _, off, _, _ in cells for k in off})
    lines = ["| seed | student | " + " | ".join(f"{k} answer − MOS" for k in kinds)
             + " | SRCC | SRCC, type offsets removed |", "|" + "---|" * (len(kinds) + 4)]
    for seed, name, off, plain, fixed in cells:
        lines.append(f"| {seed} | {name} | " + " | ".join(
            f"{off[k]:+.3f}" if k in off else "–" for k in kinds)
            + f" | {plain:.3f} | {fixed:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="reproduce.py --out folders")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    runs = [load(r) for r in args.runs]
    table, results = summary(runs)
    photos = [p for p in runs[0]["config"]["data"]["test_photos"].split(",") if p]
    answers = list(held_out_answers(runs))  # each eval report read once, for all three tables
    table += "\n" + answers_table(answers, photos)
    for extra in (levels_table(answers), offsets_table(answers)):
        if extra:
            table += "\n" + extra
    if args.out:
        args.out.write_text(table)
    print(table)
    for line in results:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

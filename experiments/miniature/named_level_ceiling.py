"""How far can GRPO lift a reproduction student without naming levels better than it does?

    .venv/bin/python experiments/miniature/named_level_ceiling.py runs/bias_s0 runs/bias_s1 ...

The students of `reproduce.py` write the synthetic teacher's phrases and their answer is,
to a few hundredths, a function of the level phrase they pick (bench/level_reads.py, git). GRPO was
measured to leave the phrases where the cold start put them (docs/reproduction.md, History AQ,
AU) and to move the numbers after them. So this asks what the best such re-mapping gives: each
held-out answer is replaced by a number that depends only on the (distortion, level) its
reasoning names (`synthetic_teacher.read_level`; unreadable reasoning keeps its answer), with the
student's own answer breaking ties inside one named level:

- "named MOS": the KADID MOS of the named level (a perfectly calibrated student that names
  levels as this one does);
- "hindsight": the mean MOS of the held-out images that name that level — fitted on the scored
  set itself, an optimistic bound for any per-phrase re-mapping.

For every run folder it reads the SFT and GRPO students' reason-mode reports on the 45 centre
views and on all 405 views (eval/{sft,grpo}_reason[_held_out_views].json), prints SRCC written /
named MOS / hindsight, the share of views whose reasoning names the right level, which way the
named levels lean per distortion (the named level's MOS minus the view's own level's MOS, over
the views that name the right distortion: below 0, the reasoning names harsher levels than the
image has — how a student can offset a teacher that scores that distortion too high without
re-mapping its numbers), and ends with
`RESULT named_level_ceiling_<set> <mean hindsight bound - (SFT + 0.03)> goal 0.0`: below 0, no
re-mapping of the SFT student's named levels reaches the GRPO goal on the mean.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from synth import level_mos
from synthetic_teacher import read_level

from qponder_mlx.metrics import srcc

sys.path.insert(0, str(Path(__file__).parent))
from repro_seeds import level_of  # noqa: E402

TIE = 1e-3  # the student's answer only orders views that name the same level
SETS = {"centre": "", "all": "_held_out_views"}


Level = tuple[str, int]  # (distortion, level 1-5)


def written_answer(sample: dict) -> float | None:
    """The number the student wrote (`--readout expected` reports keep it beside the read-out)."""
    return sample.get("written_score", sample.get("score"))


def remapped(samples: list[dict]) -> dict:
    """SRCC of the written answers and of the two per-named-level re-mappings; right-level share.

    `samples`: a report's rows with "id", "mos", the written answer and "reasoning". Values
    are floats, except "lean": per distortion, see `lean`."""
    rows = [(read_level(s.get("reasoning") or ""), float(s["mos"]), float(written_answer(s)),
             level_of(s["id"])) for s in samples if written_answer(s) is not None]
    named_mos = [level_mos(*n) if n else a for n, _, a, _ in rows]
    by_named = defaultdict(list)
    for n, mos, _, _ in rows:
        if n:
            by_named[n].append(mos)
    hindsight = [float(np.mean(by_named[n])) if n else a for n, _, a, _ in rows]
    mos = [m for _, m, _, _ in rows]
    written = [a for _, _, a, _ in rows]
    return {"n": len(rows),
            "written": srcc(written, mos),
            "named_mos": srcc([v + TIE * a for v, a in zip(named_mos, written)], mos),
            "hindsight": srcc([v + TIE * a for v, a in zip(hindsight, written)], mos),
            "right": float(np.mean([n == t for n, _, _, t in rows])),
            "lean": lean([(n, t) for n, _, _, t in rows])}


def lean(named_true: list[tuple[Level | None, Level | None]]) -> dict[str, float]:
    """Per distortion: mean MOS of the named level minus MOS of the true one, over the views whose
    reasoning names the right distortion (a wrong one has no level scale to lean along; a view
    whose id carries no level, `level_of` None, has no true one)."""
    by_type = defaultdict(list)
    for n, t in named_true:
        if n and t and n[0] == t[0]:
            by_type[t[0]].append(level_mos(*n) - level_mos(*t))
    return {k: float(np.mean(v)) for k, v in sorted(by_type.items())}


def report(run: Path, student: str, suffix: str) -> dict | None:
    path = run / "eval" / f"{student}_reason{suffix}.json"
    if not path.exists():
        return None
    return remapped(json.loads(path.read_text())["samples"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="reproduce.py --out folders")
    args = ap.parse_args(argv)
    print("| run | held-out set | student | SRCC written | named MOS | hindsight | names the "
          "right level | named − own level's MOS |")
    print("|---|---|---|---|---|---|---|---|")
    gaps: dict[str, list[float]] = defaultdict(list)
    for run in args.runs:
        for name, suffix in SETS.items():
            got = {st: report(run, st, suffix) for st in ("sft", "grpo")}
            if got["sft"] is None:
                print(f"{run}: no eval/sft_reason{suffix}.json — run reproduce.py first",
                      file=sys.stderr)
                continue
            for st, r in got.items():
                if r is not None:
                    print(f"| {run.name} | {name} ({r['n']}) | {st.upper()} | {r['written']:.3f} "
                          f"| {r['named_mos']:.3f} | {r['hindsight']:.3f} | {r['right']:.0%} | "
                          + " ".join(f"{k} {v:+.2f}" for k, v in r["lean"].items()) + " |")
            gaps[name].append(got["sft"]["hindsight"] - (got["sft"]["written"] + 0.03))
    for name, g in gaps.items():
        print(f"RESULT named_level_ceiling_{name} {np.mean(g):.4f} goal 0.0")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How far GRPO moves a reproduction's cold start: its weights, and the level its reasoning names.

    .venv/bin/python bench/grpo_shift.py runs/ship_s0 [runs/bias_s0 ...]

docs/reproduction.md explains GRPO's missing +0.03 by the size of its step (History AQ, AU): the
levels were taught by SFT's 1500 steps at lr 5e-4, GRPO takes 60 at 1e-5, so it can re-map the
number after a level phrase but hardly change which phrase is picked, and what it changes there
looks like drift. This measures both halves in each `bench/reproduce.py --out` folder:

- **weights**: every adapted layer's LoRA update ΔW = scale·A·B (mlx-vlm's LoRALinear adds
  scale·(x·A)·B); GRPO's move ‖ΔW_grpo − ΔW_sft‖ against SFT's whole move ‖ΔW_sft‖ (Frobenius
  norms over all layers; SFT's LoRA starts at B = 0, so ΔW_sft is everything SFT learned), and
  SFT's move against the base weights ‖W‖ for scale. `grpo/adapters` (the weight average) and
  `grpo/adapters_last` (the last step) both, where present.
- **the decision**: per view, the (distortion, level) the SFT and the GRPO student's greedy
  reasoning names (`synthetic_teacher.read_level`) against the view's own: kept right,
  right → wrong, wrong → right, wrong → another wrong, wrong kept, on the held-out centre views,
  all held-out views and the training photos' centre views (eval/{sft,grpo}_reason*.json).

Ends with `RESULT grpo_weight_shift <mean ratio> goal n/a` (descriptive) and, per set,
`RESULT grpo_level_net_<set> <mean (wrong → right − right → wrong) / views> goal 0.0`: above 0,
GRPO's reasoning names more levels right than its cold start's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import mlx.core as mx
import numpy as np

from qponder_mlx.distill.synthetic_teacher import read_level
from qponder_mlx.metrics import srcc

sys.path.insert(0, str(Path(__file__).parent))
from named_level_ceiling import written_answer  # noqa: E402
from repro_seeds import level_of  # noqa: E402

SETS = {"centre": "", "all": "_held_out_views", "train": "_train_photos"}
MOVES = ("kept right", "right → wrong", "wrong → right", "wrong → other wrong", "kept wrong")


def lora_updates(adapter_dir: Path) -> dict[str, mx.array]:
    """{layer name: ΔW = scale·A·B (in × out)} of an mlx-vlm adapter folder."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_parameters"]["scale"]
    w = mx.load(str(adapter_dir / "adapters.safetensors"))
    return {k[: -len(".lora_a")]: scale * (w[k] @ w[k[: -len("a")] + "b"])
            for k in w if k.endswith(".lora_a")}


def frobenius(arrays: list[mx.array]) -> float:
    return float(np.sqrt(sum(float(mx.sum(a.astype(mx.float32) ** 2)) for a in arrays)))


def weight_shift(run: Path) -> dict[str, float]:
    """‖ΔW_sft‖ / ‖W_base‖ and, per GRPO adapter folder, ‖ΔW_grpo − ΔW_sft‖ / ‖ΔW_sft‖."""
    sft = lora_updates(run / "sft" / "adapters")
    base: dict[str, mx.array] = {}
    for f in sorted((run / "student_base").glob("*.safetensors")):
        base.update(mx.load(str(f)))
    sft_norm = frobenius(list(sft.values()))
    out = {"sft_vs_base": sft_norm / frobenius([base[k + ".weight"] for k in sft])}
    for name in ("adapters", "adapters_last"):
        d = run / "grpo" / name
        if d.is_dir():
            grpo = lora_updates(d)
            if grpo.keys() != sft.keys():
                raise SystemExit(f"{d}: adapts other layers than {run / 'sft' / 'adapters'}")
            out[f"grpo_{name}"] = frobenius([grpo[k] - sft[k] for k in sft]) / sft_norm
    return out


def move(sft_named: tuple | None, grpo_named: tuple | None, true: tuple) -> str:
    """Which of MOVES a view made between the SFT and the GRPO student's named level."""
    if sft_named == true:
        return MOVES[0] if grpo_named == true else MOVES[1]
    if grpo_named == true:
        return MOVES[2]
    return MOVES[4] if grpo_named == sft_named else MOVES[3]


def level_moves(sft_report: dict, grpo_report: dict) -> Counter:
    """Counter of MOVES over the views both reports answered."""
    named = {s: {x["id"]: read_level(x.get("reasoning") or "") for x in r["samples"]}
             for s, r in (("sft", sft_report), ("grpo", grpo_report))}
    return Counter(move(named["sft"][i], named["grpo"][i], level_of(i))
                   for i in named["sft"] if i in named["grpo"] and level_of(i) is not None)


def net_right(c: Counter) -> float:
    """(wrong → right − right → wrong) / views: the change in the share named right."""
    return (c[MOVES[2]] - c[MOVES[1]]) / sum(c.values())


def move_cells(c: Counter) -> str:
    """A markdown row's cells: each move's share of the views, then the net change."""
    n = sum(c.values())
    return " | ".join(f"{c[m] / n:.1%}" for m in MOVES) + f" | {net_right(c):+.1%} |"


def written_srcc(report: dict) -> float:
    """SRCC of a report's written answers against the MOS."""
    rows = [(written_answer(s), s["mos"]) for s in report["samples"]]
    rows = [(float(a), float(m)) for a, m in rows if a is not None]
    return srcc([a for a, _ in rows], [m for _, m in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="bench/reproduce.py --out folders")
    args = ap.parse_args(argv)
    shifts: dict[str, list[float]] = defaultdict(list)
    nets: dict[str, list[float]] = defaultdict(list)
    print("| run | SFT ‖ΔW‖ / ‖W‖ | GRPO (weight mean) ‖Δ‖ / SFT's "
          "| GRPO (last step) ‖Δ‖ / SFT's |")
    print("|---|---|---|---|")
    for run in args.runs:
        s = weight_shift(run)
        for k, v in s.items():
            shifts[k].append(v)
        cells = [f"{s[k]:.4f}" if k in s else "–"
                 for k in ("sft_vs_base", "grpo_adapters", "grpo_adapters_last")]
        print(f"| {run.name} | " + " | ".join(cells) + " |")
    print("\n| run | views | SRCC SFT → GRPO | " + " | ".join(MOVES) + " | net right |")
    print("|---|---|---|" + "---|" * (len(MOVES) + 1))
    for run in args.runs:
        for name, suffix in SETS.items():
            paths = [run / "eval" / f"{st}_reason{suffix}.json" for st in ("sft", "grpo")]
            if not all(p.exists() for p in paths):
                print(f"{run}: no {paths[0].name} / {paths[1].name} — run bench/reproduce.py first",
                      file=sys.stderr)
                continue
            sft, grpo = (json.loads(p.read_text()) for p in paths)
            c = level_moves(sft, grpo)
            nets[name].append(net_right(c))
            print(f"| {run.name} | {name} ({sum(c.values())}) | {written_srcc(sft):.3f} → "
                  f"{written_srcc(grpo):.3f} | " + move_cells(c))
    if shifts["grpo_adapters"]:
        print(f"RESULT grpo_weight_shift {np.mean(shifts['grpo_adapters']):.4f} goal n/a")
    for name, v in nets.items():
        print(f"RESULT grpo_level_net_{name} {np.mean(v):.4f} goal 0.0")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

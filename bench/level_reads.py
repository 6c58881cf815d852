"""Which distortion level does a reproduction student's reasoning name, and does GRPO see a choice?

    source scripts/blas_env.sh
    .venv/bin/python bench/level_reads.py --model runs/repro/student_base \
        --adapter runs/repro/sft/adapters --data runs/repro/data/train.jsonl \
        --group 4 --temperature 0.8

The students of `bench/reproduce.py` write the synthetic teacher's phrases, and their answer is
(to a few hundredths) a function of the level phrase they pick, so the phrase *is* the decision.
For `--per-level` images of every (distortion, level) of a synth-iqa label file this samples
`--group` answers at `--temperature` (GRPO's rollout, `qponder_mlx.grpo.rollout`), reads the
level each names (`synthetic_teacher.read_level`) and reports, per level and over all:

- right: the share of answers naming the image's own level (greedy: `--group 1 --temperature 0`);
- mixed: the share of groups whose answers name more than one level — only there can GRPO's
  group-normalised reward say which level is better;
- any right: the share of groups with at least one answer at the right level;
- MOS gap: the mean |MOS of the named level − MOS of the true level| over readable answers (what
  a level confusion costs under GRPO's accuracy reward: JPEG 1 read as JPEG 2 costs 0.09).

Ends with `RESULT level_reads_right <x> goal 1.0` and `RESULT level_reads_mixed_groups <x> goal
0.5` (GRPO gets a level signal on at least half of its images).
"""

from __future__ import annotations

import argparse
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

Level = tuple[str, int]


def group_stats(truths: Sequence[Level], reads: Sequence[Sequence[Level | None]],
                level_mos: dict[str, Sequence[float]]) -> dict[Level, Counter]:
    """Per true level: images, answers, answers at the right level, mixed groups, groups with
    any right answer, unreadable answers (None), and the summed MOS gap of the readable ones."""
    def mos(level: Level) -> float:
        return level_mos[level[0]][level[1] - 1]

    out: dict[Level, Counter] = defaultdict(Counter)
    for truth, group in zip(truths, reads, strict=True):
        c = out[truth]
        c["mos_gap"] += sum(abs(mos(r) - mos(truth)) for r in group if r is not None)
        c["images"] += 1
        c["answers"] += len(group)
        c["right"] += sum(r == truth for r in group)
        c["mixed"] += len(set(group)) > 1
        c["any_right"] += truth in group
        c["unread"] += sum(r is None for r in group)
    return out


def shares(c: Counter) -> dict[str, float]:
    read = c["answers"] - c["unread"]
    return {"right": c["right"] / c["answers"], "mixed": c["mixed"] / c["images"],
            "any_right": c["any_right"] / c["images"],
            "mos_gap": c["mos_gap"] / read if read else float("nan")}


def pick_rows(rows: list[dict], per_level: int, seed: int) -> list[dict]:
    """`per_level` rows of every (distortion, level), drawn with `seed`, in a fixed order."""
    by: dict[Level, list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["distortion"], int(r["level"]))].append(r)
    rng = random.Random(seed)
    return [r for k in sorted(by) for r in rng.sample(by[k], min(per_level, len(by[k])))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the run's student_base folder")
    ap.add_argument("--adapter", help="an adapters/ folder (SFT or GRPO)")
    ap.add_argument("--data", required=True, help="a synth-iqa label file (train/test.jsonl)")
    ap.add_argument("--per-level", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--pixels", type=int, default=112 * 112, help="the students' pixel budget")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import mlx.core as mx

    from qponder_mlx import generate as gen
    from qponder_mlx.distill.synthetic_teacher import read_level
    from qponder_mlx.grpo.rollout import rollout
    from qponder_mlx.images import PixelPolicy, load_image
    from qponder_mlx.io import read_jsonl
    from qponder_mlx.model import load_model
    from qponder_mlx.prompts import chat_messages
    from qponder_mlx.synth import LEVEL_MOS

    data = Path(args.data)
    rows = pick_rows(list(read_jsonl(data)), args.per_level, args.seed)
    loaded = load_model(args.model, args.adapter)
    prompt = loaded.tokenizer.apply_chat_template(chat_messages(), tokenize=False,
                                                  add_generation_prompt=True)
    pixels = PixelPolicy(min_pixels=args.pixels, max_pixels=args.pixels)
    sampling = gen.SamplingConfig(max_tokens=args.max_tokens, temperature=args.temperature)
    mx.random.seed(args.seed)
    truths, reads = [], []
    for i in range(0, len(rows), 16):  # 16 images x G rows per decode, as GRPO's steps
        chunk = rows[i:i + 16]
        images = [pixels.resize(load_image(data.parent / r["image"])) for r in chunk]
        ro = rollout(loaded.model, loaded.processor, prompt, images, args.group, sampling)
        truths += [(r["distortion"], int(r["level"])) for r in chunk]
        reads += [[read_level(c.text) for c in group] for group in ro.completions]

    def row(name: str, c: Counter) -> dict[str, float]:
        s = shares(c)
        print(f"| {name} | {c['images']} | {s['right']:.2f} | {s['mixed']:.2f} | "
              f"{s['any_right']:.2f} | {s['mos_gap']:.3f} |")
        return s

    stats = group_stats(truths, reads, LEVEL_MOS)
    total: Counter = Counter()
    print("| level | images | right | mixed groups | any right | MOS gap |")
    print("|---|---|---|---|---|---|")
    for level in sorted(stats):
        total.update(stats[level])
        row(f"{level[0]} {level[1]}", stats[level])
    s = row("all", total)
    print(f"unreadable answers: {total['unread']} of {total['answers']}")
    print(f"RESULT level_reads_right {s['right']:.3f} goal 1.0")
    print(f"RESULT level_reads_mixed_groups {s['mixed']:.3f} goal 0.5")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

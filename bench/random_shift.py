"""A random move of GRPO's size from the cold start: is what GRPO does to the named levels noise?

    .venv/bin/python bench/random_shift.py runs/ship_s0 --draws 3      # ~1 min per draw

`bench/grpo_shift.py` found GRPO moving the LoRA weights by ~1 % of what SFT moved them and
still changing the level the reasoning names on nearly half the views, for the worse. This asks
whether that is GRPO's reward at work or just the size of the step: for draw k, every LoRA
tensor p of the SFT adapter becomes p_sft + ‖p_grpo − p_sft‖·g/‖g‖ (g Gaussian, seed k) —
GRPO's own step size per tensor, in a random direction — saved as R/random_shift/rand{k}/adapters
and scored greedily in reason mode with the pipeline's eval settings (`--config`, the shipped
bench/repro_pipeline.toml by default) on the held-out centre views, all held-out views and the
training photos (R/eval/rand{k}_reason{suffix}.json; a rerun reuses what is there).

Prints, per set, the SRCC of the written answers and the level moves against SFT for GRPO and for
each draw, and ends with `RESULT random_shift_level_net_<set> <mean over draws> goal <GRPO's>`:
a random step that loses as many levels as GRPO's says GRPO's level changes are what a step of
its size does anyway.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from grpo_shift import (  # noqa: E402
    MOVES,
    SETS,
    level_moves,
    move_cells,
    net_right,
    written_srcc,
)
from reproduce import BENCH, Runner, load_pipeline  # noqa: E402


def random_adapter(sft_dir: Path, grpo_dir: Path, out_dir: Path, seed: int) -> None:
    """SFT's LoRA tensors moved by GRPO's per-tensor step norm in a random direction."""
    sft = mx.load(str(sft_dir / "adapters.safetensors"))
    grpo = mx.load(str(grpo_dir / "adapters.safetensors"))
    key = mx.random.key(seed)
    moved = {}
    for name in sorted(sft):
        key, sub = mx.random.split(key)
        g = mx.random.normal(sft[name].shape, key=sub)
        step = mx.linalg.norm((grpo[name] - sft[name]).astype(mx.float32).reshape(-1))
        moved[name] = (sft[name] + step * g / mx.linalg.norm(g.reshape(-1))).astype(sft[name].dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), moved)
    (out_dir / "adapter_config.json").write_text((sft_dir / "adapter_config.json").read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished bench/reproduce.py --out folder")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--config", type=Path, default=BENCH / "repro_pipeline.toml",
                    help="the pipeline TOML whose [eval] and [data] size the run was made with")
    args = ap.parse_args(argv)
    r = args.run
    cfg = load_pipeline(args.config)
    pixels = str(cfg.data.size ** 2)
    runner = Runner(r)
    names = [f"rand{k}" for k in range(args.draws)]
    for k, name in enumerate(names):
        adapter = r / "random_shift" / name / "adapters"
        if not (adapter / "adapters.safetensors").exists():
            random_adapter(r / "sft" / "adapters", r / "grpo" / "adapters", adapter, seed=k)
        for suffix in SETS.values():
            out = r / "eval" / f"{name}_reason{suffix}.json"
            if out.exists():
                continue
            split = suffix[1:] or "test"  # bench/reproduce.py's report names: test has none
            print(f"[{out.stem}]", flush=True)
            runner(f"eval_{out.stem}", [
                "eval", "--data", str(r / "data" / f"{split}.jsonl"), "--model",
                str(r / "student_base"), "--adapter", str(adapter), "--mode", "reason",
                "--batch-size", str(cfg.eval.batch_size), "--max-tokens",
                str(cfg.eval.max_tokens), "--min-pixels", pixels, "--max-pixels", pixels,
                "--out", str(out)])

    def report(student: str, suffix: str) -> dict:
        return json.loads((r / "eval" / f"{student}_reason{suffix}.json").read_text())

    print("| set | student | SRCC written | " + " | ".join(MOVES) + " | net right |")
    print("|---|---|---|" + "---|" * (len(MOVES) + 1))
    results = []
    for set_name, suffix in SETS.items():
        sft = report("sft", suffix)
        print(f"| {set_name} | SFT | {written_srcc(sft):.3f} |" + " |" * (len(MOVES) + 1))
        nets = {}
        for student in ["grpo", *names]:
            got = report(student, suffix)
            c = level_moves(sft, got)
            nets[student] = net_right(c)
            print(f"| {set_name} | {student} | {written_srcc(got):.3f} | " + move_cells(c))
        results.append(f"RESULT random_shift_level_net_{set_name} "
                       f"{np.mean([nets[n] for n in names]):.4f} goal {nets['grpo']:.4f}")
    print("\n".join(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

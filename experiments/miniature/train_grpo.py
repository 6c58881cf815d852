"""The miniature's GRPO stage: the product's `run_grpo` plus three settings only this experiment
uses, none of which helped enough to ship in the product (LOG.md has the measurements):

* `train_decimals = false`  the answer's digits after the point are left out of the loss, so
                            GRPO cannot tie every answer's first decimal to one shared digit;
* `average_every = N`       the run's adapters are the mean of the weights after steps N, 2N, ...
                            (`averaging.WeightAverage`; the last step's go to adapters_last/);
* `judge_decimals = false`  the consistency judge reads only the implied score's leading digit.

    python experiments/miniature/train_grpo.py --config configs/grpo.toml --model M \
        --data train.jsonl --adapter RUN/sft/adapters --out RUN/grpo [--set key=value ...]

Everything else (rollout, rewards, loss, checkpoints, resume, stop signals) is the product's,
reached through `run_grpo`'s `reward_fn`, `token_mask` and `on_step` arguments.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from averaging import WeightAverage

from qponder_mlx.grpo.config import GRPOConfig
from qponder_mlx.grpo.judge import blind_scores_vlm
from qponder_mlx.grpo.step import default_reward_fn
from qponder_mlx.grpo.trainer import run_grpo
from qponder_mlx.io import atomic_write_json
from qponder_mlx.model import load_model
from qponder_mlx.prompts import answer_number_span
from qponder_mlx.train.config import ConfigError, load_config, parse_set_flags, read_config_file
from qponder_mlx.train.lora import adapter_weights, write_adapters
from qponder_mlx.train.runner import RunStopped

AVERAGE_DIR = "average"  # snapshots of the weights at the averaged steps
LAST_DIR = "adapters_last"
DONE_FILE = "miniature.json"  # written last: the stage is complete


@dataclass
class MiniatureGRPOConfig(GRPOConfig):
    train_decimals: bool = True
    average_every: int = 0
    judge_decimals: bool = True


# ---------------------------------------------------------------- train_decimals


def answer_tokens(tokenizer, token_ids: list[int], part: str = "decimals") -> list[bool]:
    """Which tokens of a completion lie wholly inside its answer's number (part "number") or its
    decimals (part "decimals": `3.72` -> the tokens of `72`). Offsets come from decoding token by
    token: the answer is ASCII, so the joined pieces locate it as the whole decode would."""
    pieces = [tokenizer.decode([t]) for t in token_ids]
    span = answer_number_span("".join(pieces), part)
    out, pos = [], 0
    for piece in pieces:
        end = pos + len(piece)
        out.append(span is not None and bool(piece) and span[0] <= pos and end <= span[1])
        pos = end
    return out


def without_answer_tokens(mask: mx.array, group, tokenizer, part: str = "decimals") -> mx.array:
    """`mask` (G, T) with each completion's answer number or decimals set to 0 (out of the loss):
    a `run_grpo(token_mask=...)` hook."""
    flags = [answer_tokens(tokenizer, c.token_ids, part) for c in group]
    drop = [f + [False] * (mask.shape[1] - len(f)) for f in flags]
    return mx.where(mx.array(drop), 0, mask).astype(mask.dtype)


# ---------------------------------------------------------------- average_every


def snapshot_path(run_dir: Path, step: int) -> Path:
    return run_dir / AVERAGE_DIR / f"step_{step:07d}.safetensors"


def fold_average(run_dir: Path, every: int, iters: int) -> WeightAverage:
    """The running mean of the snapshots at steps every, 2·every, ... <= iters, folded in step
    order (the same arithmetic as averaging during the run)."""
    average = WeightAverage(every)
    for step in filter(average.due, range(1, iters + 1)):
        path = snapshot_path(run_dir, step)
        if not path.exists():
            raise ConfigError(f"{path}: missing snapshot of an averaged step — rerun the stage "
                              "with a fresh --out")
        average.add(dict(mx.load(str(path))))
    return average


def finish_average(run_dir: Path, every: int, iters: int) -> int:
    """adapters/ <- the mean, adapters_last/ <- the last step's weights; returns the count."""
    average = fold_average(run_dir, every, iters)
    if not average.count:
        return 0
    adapters, last = run_dir / "adapters", run_dir / LAST_DIR
    if last.exists():
        shutil.rmtree(last)
    shutil.copytree(adapters, last)
    config = json.loads((adapters / "adapter_config.json").read_text())
    write_adapters(average.weights(), config, adapters)
    return average.count


# ---------------------------------------------------------------- the stage


def train(cfg: MiniatureGRPOConfig, *, resume: bool = False, reward_fn=None,
          loaded=None) -> Path:
    loaded = loaded or load_model(cfg.model)
    run_dir = Path(cfg.out)

    def judge(reasonings):
        return blind_scores_vlm(loaded.model, loaded.processor.tokenizer, reasonings,
                                decimals=cfg.judge_decimals)

    schedule = WeightAverage(cfg.average_every)

    def on_step(step: int, info: dict) -> None:
        if schedule.due(step):
            path = snapshot_path(run_dir, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            mx.save_safetensors(str(path), adapter_weights(loaded.model))

    if cfg.rewards.judge != "policy" and cfg.rewards.needs_judge():
        raise ConfigError("the miniature's judge is the policy (rewards.judge = \"policy\")")
    mask = (None if cfg.train_decimals else
            lambda m, group, tok: without_answer_tokens(m, group, tok, "decimals"))
    run_grpo(cfg, resume=resume, loaded=loaded,
             reward_fn=reward_fn or default_reward_fn(cfg, cfg.group_size, judge),
             token_mask=mask, on_step=on_step)
    count = finish_average(run_dir, cfg.average_every, cfg.iters) if cfg.average_every else 0
    atomic_write_json(run_dir / DONE_FILE, {"averaged_steps": count,
                                            "adapters_last": str(run_dir / (
                                                LAST_DIR if count else "adapters"))})
    return run_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--model"), ap.add_argument("--data"), ap.add_argument("--out")
    ap.add_argument("--adapter")
    ap.add_argument("--min-pixels", type=int), ap.add_argument("--max-pixels", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    flags = {"model": args.model, "data": args.data, "out": args.out, "adapter": args.adapter,
             "min_pixels": args.min_pixels, "max_pixels": args.max_pixels, "seed": args.seed,
             "progress": False if args.no_progress else None}
    try:
        overrides = {k: v for k, v in flags.items() if v is not None}
        overrides.update(parse_set_flags(args.sets))
        cfg = load_config(MiniatureGRPOConfig, args.config, overrides)
        saved = Path(cfg.out) / "config.json"
        if args.resume and saved.exists():
            cfg = load_config(MiniatureGRPOConfig, args.config, overrides,
                              base=read_config_file(saved))
        if cfg.average_every < 0:
            raise ConfigError(f"average_every must be >= 0, got {cfg.average_every}")
        train(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"stopped at step {e.step}; checkpoint saved — rerun with --resume")
        return e.exit_code
    print(f"done: {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

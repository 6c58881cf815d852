"""`qponder train --stage grpo`: `grpo_step` inside the run loop SFT uses too (train/runner.py:
run folder, resume, stop signals, bad steps, metrics and curves, progress), with SFT's LoRA/QLoRA,
data order and atomic checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from qponder_mlx.grpo.config import GRPOConfig
from qponder_mlx.grpo.judge import make_judge
from qponder_mlx.grpo.step import RewardFn, TokenMask, default_reward_fn, grpo_step
from qponder_mlx.images import ImageError, PixelPolicy, load_image
from qponder_mlx.io import read_jsonl
from qponder_mlx.labels import LabelError, LabelProblem, Sample, read_labels
from qponder_mlx.model import LoadedModel, load_model
from qponder_mlx.progress import say
from qponder_mlx.prompts import chat_messages
from qponder_mlx.train import checkpoint as ckpt_mod
from qponder_mlx.train.config import ConfigError
from qponder_mlx.train.data_order import DataOrder
from qponder_mlx.train.distributed import World, init_world
from qponder_mlx.train.loop import make_optimizer, peak_memory_gb
from qponder_mlx.train.lora import (
    adapters_disabled,
    attach_lora,
    load_adapters,
    quantize_language_model,
    trainable_snapshot,
    weights_swapped,
)
from qponder_mlx.train.runlog import METRICS_FILE
from qponder_mlx.train.runner import (
    LoopSettings,
    Run,
    StepOutcome,
    mean_row,
    problem_row,
    train_loop,
)
from qponder_mlx.train.sft_rows import image_size

# Steps in a row with equal rewards in every group before the run warns that it cannot learn.
NO_SIGNAL_STEPS = 5

# Settings a resumed run must share with its checkpoint: anything else would silently train a
# different model or read different images.
RESUME_MUST_MATCH = ("model", "adapter", "data", "lora", "quantize_base", "quantize_group_size",
                     "batch_size", "group_size", "seed", "min_pixels", "max_pixels")

# The GRPO page of curves.html: reward per component, accuracy, KL/clip, lengths, time split.
GRPO_CHARTS = [
    ("reward (total and per component)",
     ["reward_mean", "reward_format_mean", "reward_accuracy_mean", "reward_consistency_mean",
      "reward_rank_mean"], False),
    ("format rate and score MAE vs MOS", ["format_rate", "score_mae"], False),
    ("KL to reference and clip ratio", ["kl", "clip_ratio"], False),
    ("completion length (tokens)", ["completion_length"], False),
    ("step time split (s)", ["time_rollout", "time_reward", "time_update"], False),
    ("peak memory (GB)", ["peak_memory_gb"], False),
]


def prepare_model(cfg: GRPOConfig, loaded: LoadedModel | None) -> tuple[LoadedModel, dict]:
    """The base model (loaded here unless given) with the run's adapter or a fresh LoRA; returns
    it and the adapter config."""
    loaded = loaded or load_model(cfg.model)
    model = loaded.model
    mx.random.seed(cfg.seed)  # LoRA A matrices come from the global RNG
    if cfg.adapter:
        if cfg.quantize_base:
            quantize_language_model(model, cfg.quantize_base, cfg.quantize_group_size)
        adapter_cfg = load_adapters(model, cfg.adapter)
    else:
        adapter_cfg = attach_lora(model, cfg.lora, quantize_bits=cfg.quantize_base,
                                  group_size=cfg.quantize_group_size)
    return loaded, adapter_cfg


def reference_policy(cfg: GRPOConfig, model):
    """The KL reference / reference judge as a context manager factory."""
    if cfg.reference == "base" or not cfg.adapter:
        # A fresh LoRA starts with B = 0, so "adapters off" IS the initial policy, bit for bit.
        return adapters_disabled
    snapshot = trainable_snapshot(model)  # taken before a resumed checkpoint is restored
    return lambda m: weights_swapped(m, snapshot)


def _token_count(pixels: PixelPolicy, s: Sample) -> int:
    try:
        return pixels.token_count(image_size(s.image))
    except (ImageError, OSError, ValueError):
        return 0  # fails again, and is reported, when the step loads it


def _load_images(samples: list[Sample], idx: list[int], pixels: PixelPolicy, run: Run,
                 bad: set[int]):
    imgs, mos = [], []
    for i in idx:
        try:
            imgs.append(pixels.resize(load_image(samples[i].image), name=str(samples[i].image)))
            mos.append(samples[i].mos)
        except (ImageError, OSError) as e:
            bad.add(i)  # left out of later epochs; one bad photo never stops the run
            run.problem(problem_row(samples[i].image, None, "image_runtime", str(e)))
            say(f"skipped image {samples[i].id}: {' '.join(str(e).split())}")
    return imgs, mos


def _next_images(samples, order: DataOrder, pixels: PixelPolicy, run: Run, world: World):
    """This rank's images of the next global batch in which every rank has at least one.

    Ranks agree on rows that failed to load, so they keep one data order; a batch leaving some
    rank empty (a short last batch, or failed images) is skipped by all.
    """
    while True:
        known = len(order.bad)
        imgs, mos = _load_images(samples, world.shard(order.next()), pixels, run, order.bad)
        if world.size == 1:
            if imgs:
                return imgs, mos
            continue
        flags = world.sum({"empty": float(not imgs), "new_bad": float(len(order.bad) - known)},
                          "data-order sync")
        if flags["new_bad"]:
            order.bad = world.union(order.bad, len(order.lengths))
        if not flags["empty"]:
            return imgs, mos


def run_grpo(cfg: GRPOConfig, *, resume: bool = False, loaded: LoadedModel | None = None,
             reward_fn: RewardFn | None = None, token_mask: TokenMask | None = None,
             on_step=None, world: World | None = None) -> Path:
    """Train (or resume) a GRPO run; returns the run folder.

    `reward_fn` replaces the configured rewards and `token_mask` the loss's token mask
    (experiments); `on_step(step, metrics)` runs after each step's checkpoint. Under
    `mlx.launch` each rank rolls out its share of every global batch of images and only rank 0
    writes files (see train/distributed.py). A stop signal raises `runner.RunStopped` once the
    step's checkpoint is saved.
    """
    cfg.validate()
    world = world or init_world()
    if cfg.batch_size < world.size:
        raise ConfigError(f"batch_size {cfg.batch_size} < {world.size} ranks: every rank needs "
                          "at least one image per step")
    run = Run(cfg, "grpo", resume=resume, world=world, must_match=RESUME_MUST_MATCH)
    pixels = PixelPolicy(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)

    # Data first: a bad label file should fail before minutes of model preparation.
    samples, problems = read_labels(cfg.data, format=cfg.data_format,
                                    images_root=cfg.images_root)
    run.record_problems([problem_row(p.file, p.row, "label", p.message) for p in problems])
    say(f"grpo data {cfg.data}: {len(samples)} images, {len(problems)} rows skipped")
    if not samples:
        first = f" — first: {problems[0]}" if problems else ""
        raise LabelError([LabelProblem(cfg.data, None, f"no usable samples ({len(problems)} "
                                       f"rows had problems){first}")])

    loaded, adapter_cfg = prepare_model(cfg, loaded)
    model, processor = loaded.model, loaded.processor
    reference = reference_policy(cfg, model)  # before a checkpoint is restored: the run's start
    tok = processor.tokenizer
    prompt = tok.apply_chat_template(chat_messages(), tokenize=False, add_generation_prompt=True)
    optimizer, _ = make_optimizer(cfg, cfg.iters * cfg.num_iterations)
    # Batches of equal-size images prefill together in the rollout.
    lengths = [_token_count(pixels, s) for s in samples]
    order = run.data_order(lengths, cfg.batch_size, cfg.seed)
    run.restore(model, optimizer, adapter_cfg)
    run.begin()
    judge = make_judge(cfg.rewards.judge, model, tok, reference=reference)
    reward_fn = reward_fn or default_reward_fn(cfg, cfg.group_size, judge)

    flat = {"steps": 0, "warned": False}

    def step(n: int) -> StepOutcome:
        mx.random.seed(ckpt_mod.step_seed(cfg.seed, n))  # sampling, resumable
        imgs, mos = _next_images(samples, order, pixels, run, world)
        res = grpo_step(model, processor, prompt, imgs, mos, cfg, optimizer, reward_fn,
                        world, reference=reference, token_mask=token_mask)
        m = res.metrics
        # Equal rewards within every group give zero advantages: the step cannot learn.
        flat["steps"] = flat["steps"] + 1 if m.get("reward_group_std", 0.0) == 0.0 else 0
        if flat["steps"] >= NO_SIGNAL_STEPS and not flat["warned"]:
            flat["warned"] = True
            say(f"warning: for {flat['steps']} steps in a row every group's rewards were equal "
                f"(reward {m['reward_mean']:.3f}, format rate {m['format_rate']:.2f}): no "
                "advantage, no learning. Likely cause: no SFT cold start, so the model never "
                "writes the answer format (pass --adapter RUN/adapters of `qponder train "
                "--stage sft`), or the wrong --adapter")
        return StepOutcome(not res.skipped, m["loss"], m,
                           {"reward": f"{m['reward_mean']:.3f}", "fmt": f"{m['format_rate']:.2f}",
                            "mem": f"{peak_memory_gb():.2f}GB"})

    def save(n: int) -> None:
        run.save(n, model, adapter_cfg, optimizer, order)

    mx.reset_peak_memory()
    bad = train_loop(run, LoopSettings(cfg.iters, cfg.steps_per_report, cfg.steps_per_save,
                                       cfg.max_bad_steps, cfg.progress),
                     step, save, report=lambda outs: mean_row([o.metrics for o in outs]),
                     on_step=on_step, charts=GRPO_CHARTS)
    run.finish({"skipped_steps": bad, "images": len(samples),
                "skipped_rows": len(problems) + len(order.bad)})
    return run.dir


def metric_curve(run_dir: str | Path, key: str = "reward_mean") -> np.ndarray:
    """One logged training metric per step (for tests and reports)."""
    rows = read_jsonl(Path(run_dir) / METRICS_FILE)
    return np.array([r[key] for r in rows if r.get("kind") == "train"], dtype=float)

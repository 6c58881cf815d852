"""`qponder train --stage grpo`: the run loop around `grpo_step`.

Everything around the step is SFT's: config loading and saving, LoRA/QLoRA, the data order,
atomic checkpoints and exact resume, metrics.jsonl and the curves page, progress.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from qponder_mlx.data import LabelError, LabelProblem, Sample, read_labels
from qponder_mlx.grpo.config import GRPOConfig
from qponder_mlx.grpo.judge import make_judge
from qponder_mlx.grpo.step import RewardFn, default_reward_fn, grpo_step
from qponder_mlx.images import ImageError, PixelPolicy, load_image
from qponder_mlx.io import append_jsonl, atomic_write_json, read_jsonl
from qponder_mlx.model import LoadedModel, load_model
from qponder_mlx.progress import console, progress_bar
from qponder_mlx.prompts import chat_messages
from qponder_mlx.train import checkpoint as ckpt_mod
from qponder_mlx.train.averaging import AVERAGE_FILE, WeightAverage
from qponder_mlx.train.config import ConfigError, config_dict, save_config
from qponder_mlx.train.data import DataOrder, image_size
from qponder_mlx.train.distributed import World, init_world
from qponder_mlx.train.loop import make_optimizer, peak_memory_gb
from qponder_mlx.train.lora import (
    adapter_weights,
    adapters_disabled,
    attach_lora,
    load_adapters,
    quantize_language_model,
    trainable_snapshot,
    weights_swapped,
)
from qponder_mlx.train.runlog import METRICS_FILE, MetricsLog, write_curves

ADAPTERS_DIR = "adapters"
LAST_DIR = "adapters_last"  # with average_every: the last step's weights
PROBLEMS_FILE = "data_problems.jsonl"
SUMMARY_FILE = "summary.json"

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


def _load_images(samples: list[Sample], idx: list[int], pixels: PixelPolicy,
                 problems_path: Path | None, bad: set[int]):
    imgs, mos = [], []
    for i in idx:
        try:
            imgs.append(pixels.resize(load_image(samples[i].image), name=str(samples[i].image)))
            mos.append(samples[i].mos)
        except (ImageError, OSError) as e:
            bad.add(i)  # left out of later epochs; one bad photo never stops the run
            if problems_path is not None:
                append_jsonl(problems_path, {"id": samples[i].id,
                                             "image": str(samples[i].image), "error": str(e)})
    return imgs, mos


def _next_images(samples, order: DataOrder, pixels: PixelPolicy, problems_path: Path | None,
                 world: World):
    """This rank's images of the next global batch in which every rank has at least one.

    Ranks agree on rows that failed to load, so they keep one data order; a batch leaving some
    rank empty (a short last batch, or failed images) is skipped by all.
    """
    while True:
        known = len(order.bad)
        imgs, mos = _load_images(samples, world.shard(order.next()), pixels, problems_path,
                                 order.bad)
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


def run(cfg: GRPOConfig, *, resume: bool = False, loaded: LoadedModel | None = None,
        reward_fn: RewardFn | None = None, world: World | None = None) -> Path:
    """Train (or resume) a GRPO run; returns the run folder.

    Under `mlx.launch` each rank rolls out its share of every global batch of images and only
    rank 0 writes files (see train/distributed.py).
    """
    cfg.validate()
    world = world or init_world()
    if cfg.batch_size < world.size:
        raise ConfigError(f"batch_size {cfg.batch_size} < {world.size} ranks: every rank needs "
                         "at least one image per step")
    run_dir, ckpt = ckpt_mod.open_run(cfg.out, resume, world.is_main)
    pixels = PixelPolicy(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)

    # Data first: a bad label file should fail before minutes of model preparation.
    samples, problems = read_labels(cfg.data, format=cfg.data_format,
                                    images_root=cfg.images_root)
    problems_path = run_dir / PROBLEMS_FILE if world.is_main else None
    if ckpt is None and problems_path is not None:
        problems_path.unlink(missing_ok=True)
        for p in problems:
            append_jsonl(problems_path, {"problem": str(p)})
    console.print(f"grpo data {cfg.data}: {len(samples)} images, {len(problems)} rows skipped")
    if not samples:
        first = f" — first: {problems[0]}" if problems else ""
        raise LabelError([LabelProblem(cfg.data, None, f"no usable samples ({len(problems)} "
                                       f"rows had problems){first}")])
    groups = cfg.batch_keys([s.id for s in samples])

    loaded, adapter_cfg = prepare_model(cfg, loaded)
    model, processor = loaded.model, loaded.processor
    reference = reference_policy(cfg, model)  # before a checkpoint is restored: the run's start
    if cfg.train_only:  # a pattern that matches nothing fails here, not after a step
        names = [n for n, _ in tree_flatten(model.trainable_parameters())]
        console.print(f"train_only {cfg.train_only!r}: {len(cfg.trained_names(names))} of "
                      f"{len(names)} trainable weights move")
    tok = processor.tokenizer
    prompt = tok.apply_chat_template(chat_messages(), tokenize=False, add_generation_prompt=True)
    optimizer = make_optimizer(cfg.learning_rate, cfg.iters * cfg.num_iterations,
                               warmup=cfg.warmup, schedule=cfg.lr_schedule,
                               min_learning_rate=cfg.min_learning_rate,
                               weight_decay=cfg.weight_decay)
    # Batches of equal-size images prefill together in the rollout.
    lengths = [_token_count(pixels, s) for s in samples]
    order = DataOrder(lengths, cfg.batch_size, cfg.seed,
                      state=ckpt.state.get("data") if ckpt else None,
                      groups=groups)
    start = 0
    average = WeightAverage(cfg.average_every)
    if ckpt is not None:
        ckpt_mod.restore_checkpoint(ckpt, model, optimizer)
        average.restore(ckpt.path, ckpt.state)
        start = ckpt.step
        console.print(f"resumed from {ckpt.path} (step {start})")
        if world.is_main:  # they may lag the checkpoint (a kill between the two writes)
            ckpt_mod.write_run_adapters(run_dir, model, adapter_cfg, ADAPTERS_DIR,
                                        average.weights(), LAST_DIR)
    if world.is_main:
        save_config(cfg, run_dir)
    log = MetricsLog(run_dir, resume_step=start if ckpt is not None else None,
                     enabled=world.is_main)
    judge = make_judge(cfg.rewards.judge, model, tok, reference=reference,
                       decimals=cfg.rewards.judge_decimals)
    reward_fn = reward_fn or default_reward_fn(cfg, cfg.group_size, judge)

    def save(step: int) -> None:
        if not world.is_main:
            return
        mean = average.weights()
        ckpt_mod.save_run(run_dir, step, model, adapter_cfg, optimizer,
                          {"data": order.state(), "bad_steps": bad_steps, **average.state()},
                          config_dict(cfg), cfg.keep_checkpoints, ADAPTERS_DIR,
                          arrays={AVERAGE_FILE: mean} if mean else None, adapters=mean,
                          last_dir=LAST_DIR)

    bad_steps = int(ckpt.state.get("bad_steps", 0)) if ckpt else 0
    consecutive_bad = 0
    mx.reset_peak_memory()
    t_run = time.perf_counter()
    with progress_bar(cfg.iters, "grpo", unit="step",
                      enabled=cfg.progress and world.is_main) as advance:
        if start:
            advance(start)
        for step in range(start + 1, cfg.iters + 1):
            mx.random.seed(ckpt_mod.step_seed(cfg.seed, step))  # sampling, resumable
            imgs, mos = _next_images(samples, order, pixels, problems_path, world)
            res = grpo_step(model, processor, prompt, imgs, mos, cfg, optimizer, reward_fn,
                            world, reference=reference)
            m = res.metrics
            if res.skipped:
                bad_steps += 1
                consecutive_bad += 1
                log.append({"step": step, "kind": "skip", "loss": m["loss"],
                            "reason": "non-finite loss or gradient"})
                console.print(f"[red]step {step}: non-finite loss/gradient — skipped, adapters "
                              "unchanged[/]")
                if consecutive_bad >= cfg.max_bad_steps:
                    raise FloatingPointError(
                        f"{consecutive_bad} consecutive steps with NaN/inf — lower "
                        "learning_rate (the last good state is in the checkpoints)")
            else:
                consecutive_bad = 0
                if step % cfg.steps_per_report == 0 or step == cfg.iters:
                    log.append({"step": step, "kind": "train", **m})
            if average.due(step):
                average.add(adapter_weights(model))
            advance(1, reward=f"{m['reward_mean']:.3f}", fmt=f"{m['format_rate']:.2f}",
                    mem=f"{peak_memory_gb():.2f}GB")
            if (step % cfg.steps_per_save == 0 or step == cfg.iters) and world.is_main:
                save(step)
                write_curves(run_dir, f"GRPO {run_dir.name}", charts=GRPO_CHARTS)
    if not world.is_main:
        return run_dir
    atomic_write_json(run_dir / SUMMARY_FILE, {
        "steps": cfg.iters, "resumed_from": start, "skipped_steps": bad_steps,
        "images": len(samples), "skipped_rows": len(problems) + len(order.bad),
        "seconds": round(time.perf_counter() - t_run, 2),
        "peak_memory_gb": round(peak_memory_gb(), 4), "adapters": str(run_dir / ADAPTERS_DIR),
        "averaged_steps": average.count,
        "adapters_last": str(run_dir / (LAST_DIR if average.count else ADAPTERS_DIR))})
    return run_dir


def metric_curve(run_dir: str | Path, key: str = "reward_mean") -> np.ndarray:
    """One logged training metric per step (for tests and the reproduction report)."""
    rows = read_jsonl(Path(run_dir) / METRICS_FILE)
    return np.array([r[key] for r in rows if r.get("kind") == "train"], dtype=float)

"""GRPO step with several images' groups in one backward pass vs image by image, side by side.

`loss_images = K` stacks the groups of K images whose prompts have one length into one pass
(`grpo.step.loss_groups`) for the KL reference's log-probs and for the gradient; the baseline,
`loss_images = 1`, runs one pass per image (the code before). Same loss, same gradient (tested in
tests/test_grpo_step.py); the question is time. A small student pays mostly per pass, not per
row: the miniature reproduction's GRPO spends ~2/3 of each step in the update.

The model is the reproduction's student (bench/repro_pipeline.toml: hidden 256 x 2 layers,
320-wide 3-layer DCT-stem tower, LoRA rank 32 on the 7 LM linears and the head), 112 x 112 crops
of the bundled CC0 photos, G = 4 at T = 0.8, up to 72 new tokens (the reproduction's answers are
~70), beta = 0.1, `loss_rows` = 4, `max_rows` = 64: bench/repro_grpo.toml's settings. Each
round runs one step per side from the same weights (SGD at lr 0, so nothing moves) and the same
seed, so both sides update on the same rollout; the loss must agree (checked). The first round
warms up; the median of the rest is reported.

    .venv/bin/python bench/grpo_loss_images.py [--images 32] [--loss-images 16] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_speed import LABELS, _reexec_with_openblas, prompt_text  # noqa: E402

if __name__ == "__main__":
    _reexec_with_openblas()

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from PIL import ImageOps  # noqa: E402

from qponder_mlx.data import read_labels  # noqa: E402
from qponder_mlx.grpo.config import GRPOConfig  # noqa: E402
from qponder_mlx.grpo.rewards import RewardConfig  # noqa: E402
from qponder_mlx.grpo.step import default_reward_fn, grpo_step  # noqa: E402
from qponder_mlx.images import PixelPolicy, load_image  # noqa: E402
from qponder_mlx.model import load_model  # noqa: E402
from qponder_mlx.testing import build_tiny_model  # noqa: E402
from qponder_mlx.train.config import LoraConfig  # noqa: E402
from qponder_mlx.train.lora import attach_lora  # noqa: E402

GOAL = 2.0  # update time, one pass per image ÷ stacked
SIDE = 112
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def crops(n: int):
    """n SIDE x SIDE crops of the bundled CC0 photos (cycling, each photo at a new offset)."""
    samples, _ = read_labels(str(LABELS))
    pixels = PixelPolicy(min_pixels=SIDE * SIDE, max_pixels=SIDE * SIDE)  # as the trainer does
    out, mos = [], []
    for i in range(n):
        s = samples[i % len(samples)]
        im = load_image(s.image)
        shift = (i // len(samples)) / 4
        out.append(pixels.resize(ImageOps.fit(im, (SIDE, SIDE), centering=(shift % 1, 0.5))))
        mos.append(s.mos)
    return out, mos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="images per GRPO step")
    ap.add_argument("--loss-images", type=int, default=16, help="the stacked side's loss_images")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds (after one warm-up)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp), hidden_size=256, num_layers=2, vision_hidden=320,
                                vision_depth=3, vision_stem="dct")
        loaded = load_model(str(path))
    model, proc = loaded.model, loaded.processor
    mx.random.seed(0)
    attach_lora(model, LoraConfig(rank=32, alpha=128.0, target_modules=TARGETS))
    imgs, mos = crops(args.images)
    prompt = prompt_text(proc)
    sides = {"per_image": 1, "stacked": args.loss_images}
    cfgs = {k: GRPOConfig(data="bench", group_size=4, max_rows=64, loss_rows=4, loss_images=v,
                          beta=0.1, temperature=0.8, max_completion_length=72,
                          rewards=RewardConfig(consistency_weight=0.0))
            for k, v in sides.items()}
    for c in cfgs.values():
        c.validate()
    opt = optim.SGD(learning_rate=0.0)  # every round starts from the same weights
    times = {k: {"update": [], "step": []} for k in sides}
    for rnd in range(args.reps + 1):
        losses = {}
        for name, cfg in cfgs.items():
            mx.random.seed(1000 + rnd)  # both sides sample the same rollout
            t0 = time.perf_counter()
            res = grpo_step(model, proc, prompt, imgs, mos, cfg, opt,
                            default_reward_fn(cfg, cfg.group_size, None))
            wall = time.perf_counter() - t0
            losses[name] = res.metrics["loss"]
            if rnd:
                times[name]["update"].append(res.metrics["time_update"])
                times[name]["step"].append(wall)
            m = res.metrics
            print(f"round {rnd} {name:9s} step {wall:6.2f} s  update {m['time_update']:6.2f} s"
                  f"  rollout {m['time_rollout']:5.2f} s  loss {losses[name]:+.6f}"
                  f"  completion {m['completion_length']:.0f}",
                  flush=True)
        assert abs(losses["stacked"] - losses["per_image"]) < 1e-5, losses
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in times.items()}
    print(f"{args.images} images x G 4, loss_images {args.loss_images} vs 1, median of {args.reps}")
    for k, d in med.items():
        print(f"  {k:9s} update {d['update']:.2f} s, whole step {d['step']:.2f} s")
    print(f"RESULT grpo_loss_images_update_speedup "
          f"{med['per_image']['update'] / med['stacked']['update']:.2f} goal {GOAL}")
    print(f"RESULT grpo_loss_images_step_speedup "
          f"{med['per_image']['step'] / med['stacked']['step']:.2f} goal 1.0")


if __name__ == "__main__":
    main()

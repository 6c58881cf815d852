"""How much of one GRPO step's gradient is signal: the coherence of independent batches' gradients.

    source scripts/blas_env.sh
    .venv/bin/python experiments/miniature/grpo_coherence.py runs/ship_s0 --batches 12

From RUN's SFT adapter (the policy GRPO starts from), with RUN's own GRPO settings
(grpo/config.json), this draws `--batches` independent batches of RUN's training images, rolls
each out once and takes the gradient of GRPO's loss on it (no update) twice: with the real MOS
and with the MOS permuted across the training rows (History BW's null, `reproduce.
shuffled_mos_rows`). The same sampling seed replays the same rollout for both.

Write each batch's gradient as g_i = s + n_i: s the direction every batch shares (what many
steps add up), n_i this batch's own noise. Then mean_{i≠j} <g_i, g_j> estimates |s|² and
mean_i |g_i|² estimates |s|² + E|n|², so

    coherence ρ = mean_{i≠j} <g_i, g_j> / mean_i |g_i|²

is the share of one step's squared gradient that is signal. The noise's share falls as 1/B
with B images per step, so a step is half signal (ρ = 1/2) at B·(1 − ρ)/ρ images. The
real-minus-null differences d_i = g_i(real) − g_i(null) hold what the labels add to the step;
their coherence says whether the MOS gives the step a direction at all.

Ends with `RESULT grpo_gradient_coherence <ρ real> goal n/a`, `RESULT
grpo_gradient_coherence_mos_part <ρ of d>` and `RESULT grpo_images_for_half_signal <images>
goal <the run's batch size>` (the step as configured would be half signal).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from qponder_mlx.grpo.config import GRPOConfig  # noqa: E402
from qponder_mlx.grpo.judge import make_judge  # noqa: E402
from qponder_mlx.grpo.step import default_reward_fn, grpo_step  # noqa: E402
from qponder_mlx.grpo.trainer import prepare_model, reference_policy  # noqa: E402
from qponder_mlx.images import PixelPolicy, load_image  # noqa: E402
from qponder_mlx.io import read_jsonl  # noqa: E402
from qponder_mlx.prompts import chat_messages  # noqa: E402
from qponder_mlx.train.config import load_config  # noqa: E402


class _Recorder:
    """An optimizer that keeps the gradient it is given and changes nothing."""

    def __init__(self):
        self.state: dict = {}
        self.grads = None

    def update(self, model, grads) -> None:
        self.grads = grads


def batch_gradient(model, processor, prompt: str, images, mos, cfg: GRPOConfig, reward_fn,
                   reference, seed: int) -> tuple[np.ndarray, list[str]]:
    """GRPO's loss gradient on one batch (flattened, float64) and the rollout's texts; the model
    is left as it was. `seed` fixes the sampling, so two calls with one seed see one rollout."""
    rec = _Recorder()
    mx.random.seed(seed)
    res = grpo_step(model, processor, prompt, images, mos, replace(cfg, grad_clip=None,
                                                                    num_iterations=1),
                    rec, reward_fn, reference=reference)
    if rec.grads is None:
        raise FloatingPointError(f"batch with seed {seed}: non-finite loss or gradient")
    flat = [np.asarray(v, dtype=np.float64).ravel() for _, v in tree_flatten(rec.grads)]
    return np.concatenate(flat), res.rollout.texts


def coherence(grads: np.ndarray) -> float:
    """ρ = mean_{i≠j} <g_i, g_j> / mean_i |g_i|² over the rows of `grads` (n ≥ 2)."""
    g = np.asarray(grads, dtype=np.float64)
    n = len(g)
    if n < 2:
        raise ValueError("coherence needs at least two gradients")
    gram = g @ g.T
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)) / (np.trace(gram) / n))


def coherence_se(grads: np.ndarray) -> float:
    """Jackknife standard error of `coherence` over the batches (n ≥ 3)."""
    g = np.asarray(grads, dtype=np.float64)
    n = len(g)
    if n < 3:
        raise ValueError("a standard error needs at least three gradients")
    loo = np.array([coherence(np.delete(g, i, axis=0)) for i in range(n)])
    return float(np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))


def images_for_half_signal(rho: float, batch_images: int) -> float:
    """Images per step at which signal and noise are equal, from ρ measured at `batch_images`
    (noise ∝ 1/B: |n|²/|s|² = (1 − ρ)/ρ at B, so equality at B·(1 − ρ)/ρ); inf if ρ ≤ 0."""
    return float("inf") if rho <= 0 else batch_images * (1 - rho) / rho


def main(argv: list[str] | None = None) -> int:
    from reproduce import shuffled_mos_rows

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a reproduce.py --out folder")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="images per batch (default: the run's GRPO batch_size)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.batches < 2:
        ap.error("--batches must be at least 2")

    saved = json.loads((args.run / "grpo" / "config.json").read_text())
    cfg = load_config(GRPOConfig, base=saved)
    cfg = replace(cfg, adapter=str(args.run / "sft" / "adapters"),
                  batch_size=args.batch_size or cfg.batch_size)
    data = args.run / "data" / "train.jsonl"
    rows = list(read_jsonl(data))
    null = [r["mos"] for r in shuffled_mos_rows(rows, args.seed)]
    pixels = PixelPolicy(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)

    loaded, _ = prepare_model(cfg, None)  # as the trainer does: the SFT adapter on the base
    model, processor = loaded.model, loaded.processor
    reference = reference_policy(cfg, model)  # GRPO's KL reference and judge at its start
    judge = make_judge(cfg.rewards.judge, model, processor.tokenizer, reference=reference,
                       decimals=cfg.rewards.judge_decimals)
    reward_fn = default_reward_fn(cfg, cfg.group_size, judge)
    prompt = processor.tokenizer.apply_chat_template(chat_messages(), tokenize=False,
                                                     add_generation_prompt=True)
    rng = np.random.default_rng(args.seed)
    real, shuffled = [], []
    for b in range(args.batches):
        idx = rng.choice(len(rows), size=cfg.batch_size, replace=False)
        images = [pixels.resize(load_image(data.parent / rows[i]["image"])) for i in idx]
        g_real, texts = batch_gradient(model, processor, prompt, images,
                                       [rows[i]["mos"] for i in idx], cfg, reward_fn,
                                       reference, seed=1000 + b)
        g_null, texts_null = batch_gradient(model, processor, prompt, images,
                                            [null[i] for i in idx], cfg, reward_fn, reference,
                                            seed=1000 + b)
        if texts != texts_null:
            raise SystemExit("the replayed rollout differs: the two gradients are not comparable")
        real.append(g_real)
        shuffled.append(g_null)
        print(f"batch {b + 1}/{args.batches}: |g| real {np.linalg.norm(g_real):.4g}, "
              f"null {np.linalg.norm(g_null):.4g}", flush=True)

    real, shuffled = np.stack(real), np.stack(shuffled)
    rhos = {"real MOS": coherence(real), "MOS permuted (null)": coherence(shuffled),
            "real − null (what the labels add)": coherence(real - shuffled)}
    print(f"\n{args.run}: {args.batches} batches of {cfg.batch_size} images × "
          f"{cfg.group_size} samples, {real.shape[1]} trainable weights")
    print("| gradient | coherence ρ ± jackknife SE | images per step for half signal |")
    print("|---|---|---|")
    for (name, rho), g in zip(rhos.items(), (real, shuffled, real - shuffled)):
        se = f" ± {coherence_se(g):.4f}" if len(g) >= 3 else ""
        print(f"| {name} | {rho:.4f}{se} | {images_for_half_signal(rho, cfg.batch_size):.0f} |")
    rho_real, rho_mos = rhos["real MOS"], rhos["real − null (what the labels add)"]
    print(f"RESULT grpo_gradient_coherence {rho_real:.4f} goal n/a")
    print(f"RESULT grpo_gradient_coherence_mos_part {rho_mos:.4f} goal n/a")
    print(f"RESULT grpo_images_for_half_signal "
          f"{images_for_half_signal(rho_real, cfg.batch_size):.0f} goal {cfg.batch_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

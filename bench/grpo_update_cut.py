"""GRPO update on groups of uneven length: chunks cut to their own length vs padded to the group.

A group of G completions is padded to its longest. `grpo.step.row_chunks` takes the rows
shortest first, `loss_rows` at a time, and cuts each chunk to its own last counted token, so
the reference log-probs (`frozen_logps`) and the gradient (`image_loss_and_grads`) skip the
padding. The baseline, run side by side in the same process on the same arrays, is the code
before the change: rows in order, every chunk at the group's full width.

The bench's large random Qwen2.5-VL (hidden 1024 x 4, as `bench/grpo_speed.py`), its 2 CC0
photos, G = 8, `loss_rows` = 2, beta > 0. A random model runs to the 64-token cap, so each row
of a real rollout is cut to a length drawn uniformly from [16, 64] — a group whose answers stop
at different places, as a trained model's do. Both sides must give the same loss (checked).

    .venv/bin/python bench/grpo_update_cut.py [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_speed import MODELS, Setup, _reexec_with_openblas, photos, prompt_text  # noqa: E402
from timing import result, run_main  # noqa: E402

from qponder_mlx import generate as gen  # noqa: E402
from qponder_mlx.grpo import step as S  # noqa: E402
from qponder_mlx.grpo.config import GRPOConfig  # noqa: E402
from qponder_mlx.grpo.rollout import pad_completions, rollout  # noqa: E402
from qponder_mlx.model import load_model  # noqa: E402
from qponder_mlx.testing import build_tiny_model  # noqa: E402
from qponder_mlx.train.lora import adapters_disabled, attach_lora  # noqa: E402

GOAL = 1.2  # token work of the completion part falls ~1.4x here; the prompt's does not


def full_width_chunks(mask: mx.array, rows: int) -> list[tuple[mx.array, int]]:
    """The baseline: rows in order, every chunk as wide as the group."""
    g, t = mask.shape
    return [(mx.arange(r0, min(r0 + rows, g)), t) for r0 in range(0, g, rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="timed updates per side (interleaved)")
    args = ap.parse_args()
    setup = Setup()
    imgs, _ = photos(setup)
    with tempfile.TemporaryDirectory() as tmp:
        hidden, layers = MODELS["large"]
        loaded = load_model(str(build_tiny_model(Path(tmp), hidden_size=hidden,
                                                 num_layers=layers)))
    model, proc = loaded.model, loaded.processor
    mx.random.seed(setup.seed)
    attach_lora(model, setup.lora)
    cfg = GRPOConfig(data="bench", group_size=setup.group_size, beta=setup.beta, loss_rows=2,
                     max_completion_length=setup.max_new)
    ro = rollout(model, proc, prompt_text(proc), imgs, cfg.group_size,
                 gen.SamplingConfig(max_tokens=setup.max_new, temperature=1.0))
    rng = np.random.default_rng(0)
    batch = []
    for group in ro.completions:
        for c in group:
            c.token_ids = c.token_ids[:int(rng.integers(16, setup.max_new + 1))]
        batch.append(pad_completions(group, proc.tokenizer.pad_token_id or 0))
    counted = sum(int(m.sum().item()) for _, m in batch)
    padded = sum(m.size for _, m in batch)
    cut_width = sum(len(c) * w for _, m in batch for c, w in S.row_chunks(m, cfg.loss_rows))
    adv = [mx.array(rng.normal(size=cfg.group_size), dtype=mx.float32) for _ in batch]

    def update() -> float:
        total = 0.0
        for i, (ids, mask) in enumerate(batch):
            with adapters_disabled(model):
                ref = S.frozen_logps(model, ro.inputs[i], ids, mask, cfg)
            loss, _, grads = S.image_loss_and_grads(model, ro.inputs[i], ids, mask, adv[i],
                                                    None, ref, cfg, len(ro.texts), counted)
            mx.eval(grads)
            total += loss
        return total

    cut = S.row_chunks
    sides = {"padded": full_width_chunks, "cut": cut}
    times: dict[str, list[float]] = {k: [] for k in sides}
    losses: dict[str, float] = {}
    for rep in range(args.reps + 1):  # the first round warms up
        for name, chunks in sides.items():
            S.row_chunks = chunks
            t0 = time.perf_counter()
            losses[name] = update()
            if rep:
                times[name].append(time.perf_counter() - t0)
    S.row_chunks = cut
    assert abs(losses["cut"] - losses["padded"]) < 1e-5, losses
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"completion tokens: {counted} counted, {padded} padded, {cut_width} in cut chunks "
          f"(loss_rows {cfg.loss_rows})")
    for k, v in times.items():
        print(f"  {k:6s} update {med[k]:.2f} s (runs {' '.join(f'{t:.2f}' for t in v)})")
    print(f"  loss padded {losses['padded']:.6f}, cut {losses['cut']:.6f}")
    result("grpo_update_cut_speedup", med["padded"] / med["cut"], GOAL)


if __name__ == "__main__":
    _reexec_with_openblas()
    run_main(main)

"""SFT step time of our two savings for repeated work, against plain rows, same process, same
batches:

- shared prefix (`share_prefix`): every SFT row starts with the same system prompt and
  instruction before its image (~half of a 194-token cold-start row);
  `sft_loss_sum` runs it once per batch and repeats its keys/values for the rows;
- tower cache (`vision_cache`): with the vision tower frozen its output is a fixed function of
  the image, computed once per image (train/image_features.py) instead of once per step.

    source scripts/blas_env.sh
    .venv/bin/python bench/sft_step_speed.py                    # a small 256 x 2 student
    .venv/bin/python bench/sft_step_speed.py --run runs/repro   # a run's own student and rows

One optimizer step = forward, backward and AdamW update of LoRA (r32 on every linear incl.
lm_head) over `--batch` rows. Ways take turns in blocks of steps on
the same batches, each way's time is the median of its steps (a shared 2-core machine); the tower
cache is filled before timing (the steady state from the second epoch). Every way's loss on the same
weights and batch is printed first: they must agree to rounding.

Ends with `RESULT sft_shared_prefix_speedup <x> goal 1.5` and `RESULT sft_step_speedup <x>
goal 2.0` (step time of plain rows / with both savings).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from timing import result, run_main  # noqa: E402

from qponder_mlx.images import PixelPolicy  # noqa: E402
from qponder_mlx.model import load_model  # noqa: E402
from qponder_mlx.testing import build_tiny_model  # noqa: E402
from qponder_mlx.testing.sft_sets import cc0_sft_rows, write_jsonl  # noqa: E402
from qponder_mlx.train.config import DEFAULT_LORA_TARGETS, LoraConfig  # noqa: E402
from qponder_mlx.train.image_features import tower_features  # noqa: E402
from qponder_mlx.train.lora import attach_lora  # noqa: E402
from qponder_mlx.train.sft import Encoder, sft_loss_sum  # noqa: E402
from qponder_mlx.train.sft_rows import read_sft_rows  # noqa: E402

# A short teacher-style answer (a cold-start row of ~190 tokens with the image)
REASONING = ("Moderate blur softens edges and texture. Noise is low. Compression artifacts are "
             "absent. Exposure is fine and colours are normal. Overall, {q} quality.")
# LoRA r32 on every language-model linear including the output head
LORA = LoraConfig(rank=32, alpha=128.0, target_modules=[*DEFAULT_LORA_TARGETS, "lm_head"])


def setup(a: argparse.Namespace, work: Path):
    if a.run:
        model_dir, data = Path(a.run) / "student_base", Path(a.run) / "distill" / "train.jsonl"
    else:  # a small student: LM 256 x 2, vision tower 320 x 3
        model_dir = build_tiny_model(work / "student", hidden_size=256, num_layers=2,
                                     vision_hidden=320, vision_depth=3)
        data = write_jsonl(work / "rows.jsonl", cc0_sft_rows(64, reasoning=REASONING))
    loaded = load_model(str(model_dir))
    pixels = PixelPolicy(a.pixels, a.pixels)
    rows, _ = read_sft_rows(data, loaded.processor.tokenizer, pixels, 4096)
    mx.random.seed(0)
    attach_lora(loaded.model, LORA)
    return loaded, rows, pixels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a run folder with student_base/ and distill/train.jsonl (e.g. "
                    "experiments/miniature/reproduce.py's)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per way")
    ap.add_argument("--block", type=int, default=3, help="steps per turn before switching")
    ap.add_argument("--pixels", type=int, default=112 * 112)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        loaded, rows, pixels = setup(a, Path(tmp))
        model, proc = loaded.model, loaded.processor
        pad = proc.tokenizer.pad_token_id or 0
        image = model.config.image_token_id
        features = tower_features(model, len(rows))
        enc = {"plain rows": Encoder(proc, rows, pixels, pad),
               "shared prefix": Encoder(proc, rows, pixels, pad, image_token_id=image),
               "+ tower cache": Encoder(proc, rows, pixels, pad, image_token_id=image,
                                        features=features)}
        batches = [list(range(i * a.batch, (i + 1) * a.batch)) for i in range(len(rows) // a.batch)]
        grad = nn.value_and_grad(model, sft_loss_sum)

        # Same weights, same batch: the losses (and so the training) agree to rounding.
        first = {k: e(batches[0]) for k, e in enc.items()}
        losses = {k: grad(model, b)[0].item() for k, b in first.items()}
        print(f"prefix {first['shared prefix'].shared_prefix} of "
              f"{first['plain rows'].input_ids.shape[1]} tokens; loss "
              + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
        for b in batches:  # fill the tower cache: the steady state
            enc["+ tower cache"](b)

        opt = optim.AdamW(learning_rate=1e-4)
        times: dict[str, list[float]] = {k: [] for k in enc}
        step = 0
        for _ in range(2):  # warm-up, both ways
            for e in enc.values():
                loss, g = grad(model, e(batches[step % len(batches)]))
                opt.update(model, g)
                mx.eval(model.parameters(), opt.state, loss)
        while min(len(t) for t in times.values()) < a.steps:
            for name, e in enc.items():
                for _ in range(a.block):
                    b = e(batches[step % len(batches)])
                    t0 = time.perf_counter()
                    loss, g = grad(model, b)
                    opt.update(model, g)
                    mx.eval(model.parameters(), opt.state, loss)
                    times[name].append(time.perf_counter() - t0)
                    step += 1
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in med.items():
            print(f"{k:14s} {v * 1000:7.1f} ms / step (median of {len(times[k])})")
        rel = max(abs(v - losses["plain rows"]) for v in losses.values()) / losses["plain rows"]
        result("sft_step_loss_rel_diff", rel, "1e-5", ".1e")
        result("sft_shared_prefix_speedup", med["plain rows"] / med["shared prefix"], 1.5)
        result("sft_step_speedup", med["plain rows"] / med["+ tower cache"], 2.0)


if __name__ == "__main__":
    run_main(main)

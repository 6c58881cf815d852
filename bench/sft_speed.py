"""SFT throughput and peak memory: qponder's trainer vs mlx-vlm 0.7.10's own `Trainer`.

Same process, same random Qwen2.5-VL, same rows (same pre-resized images, same answers), same
batch size, same LoRA (rank 16, alpha 32, no dropout, q/k/v/o/gate/up/down of the language
model), AdamW at a constant learning rate, no gradient checkpointing; mlx-vlm trains on
completions only (its `train_on_completions`), as we do.

Steady-state speed comes from the difference of two runs per trainer, `--short` and `--long`
steps: (long - short) steps / (t_long - t_short), so start-up work (dataset preparation, LoRA
setup, the final save) cancels out. Every row has the same length, so tokens per step are the
same for both trainers: batch x row length (image tokens included). Runs alternate between the
trainers and each measurement is the median of `--repeats` (3), with the load average noted
(bench/timing.py): a figure is recorded only from a quiet run.

Peak memory is `mx.get_peak_memory()` over the long run, reset after the model is loaded: it
includes the weights, which both trainers hold alike; the training overhead above the weights is
printed too.

Run: .venv/bin/python bench/sft_speed.py   (tiny model, then hidden 1024 x 4 layers; ~15 min on
2 CPU cores, where MLX's matmul is slow)
Ends with `RESULT sft_tokens_per_s_ratio <x> goal 1.0` and `RESULT sft_peak_memory_ratio <x>
goal 1.0` (ours / mlx-vlm's, on the larger model; > 1 speed and < 1 memory favour us).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from timing import median, result, run_main, sample  # noqa: E402

from qponder_mlx.images import PixelPolicy, load_image  # noqa: E402
from qponder_mlx.model import load_model  # noqa: E402
from qponder_mlx.prompts import format_response  # noqa: E402
from qponder_mlx.testing import build_tiny_model  # noqa: E402
from qponder_mlx.testing.sft_sets import CC0_IMAGES, sft_row, write_jsonl  # noqa: E402
from qponder_mlx.train.config import DEFAULT_LORA_TARGETS, SFTConfig, load_config  # noqa: E402
from qponder_mlx.train.sft import run_sft  # noqa: E402
from qponder_mlx.train.sft_rows import read_sft_rows  # noqa: E402

RANK, ALPHA, LR = 16, 32.0, 1e-4
REASONING = ("The photo is sharp and well focused on the subject. There is visible noise and "
             "grain in the shadows, and strong JPEG compression causes blocking and ringing "
             "artifacts around edges. Exposure is balanced; highlights are clipped in the sky. "
             "Colours are natural and saturated. The composition is pleasant. Overall the "
             "quality is fair.")


def make_data(work: Path, n_rows: int, side: int) -> tuple[Path, list[dict]]:
    """n rows over CC0 images resized to side x side (so both trainers see the same pixels)."""
    img_dir = work / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    policy = PixelPolicy(min_pixels=side * side, max_pixels=side * side)
    sources = sorted(CC0_IMAGES.iterdir())
    rows = []
    for i in range(n_rows):
        src = sources[i % len(sources)]
        dst = img_dir / f"{i:03d}.png"
        policy.resize(load_image(src).resize((side, side))).save(dst)
        rows.append(sft_row(dst, format_response(REASONING, 3.0), row_id=str(i)))
    return write_jsonl(work / "train.jsonl", rows), rows


def run_ours(model_dir: Path, data: Path, iters: int, batch: int, side: int,
             out: Path) -> tuple[float, int, int]:
    loaded = load_model(str(model_dir))
    cfg = load_config(SFTConfig, None, {
        "model": str(model_dir), "data": str(data), "out": str(out), "iters": iters,
        "batch_size": batch, "learning_rate": LR, "lr_schedule": "constant", "warmup": 0,
        "lora.rank": RANK, "lora.alpha": ALPHA, "lora.dropout": 0.0,
        "min_pixels": side * side, "max_pixels": side * side, "steps_per_save": 10**6,
        "steps_per_report": 10, "progress": False})
    mx.eval(loaded.model.parameters())
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    run_sft(cfg, loaded=loaded)
    return time.perf_counter() - t0, mx.get_peak_memory(), base


def run_theirs(model_dir: Path, rows: list[dict], iters: int, batch: int,
               out: Path) -> tuple[float, int, int]:
    from mlx_vlm import load
    from mlx_vlm.trainer import Trainer, VLMTrainingArgs, prepare_model_for_training

    model, processor = load(str(model_dir))
    mx.random.seed(0)
    prepare_model_for_training(model, lora_rank=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                               target_modules=list(DEFAULT_LORA_TARGETS), verbose=False)
    args = VLMTrainingArgs(batch_size=batch, iters=iters, steps_per_report=10,
                           steps_per_eval=None, steps_per_save=10**6, max_seq_length=4096,
                           train_on_completions=True,
                           adapter_file=str(out / "adapters.safetensors"))
    trainer = Trainer(model, args, processing_class=processor, train_dataset=rows,
                      optimizer=optim.AdamW(learning_rate=LR, weight_decay=0.0), seed=0)
    mx.eval(model.parameters())
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.train()  # its per-step bar and report lines would bury ours
    return time.perf_counter() - t0, mx.get_peak_memory(), base


def _fresh() -> None:
    gc.collect()
    mx.clear_cache()


def measure(name: str, model_dir: Path, work: Path, a: argparse.Namespace, spec: dict) -> dict:
    side, short, long = spec["side"], spec["short"], spec["long"]
    data, rows = make_data(work / name, a.rows, side)
    tok = load_model(str(model_dir)).tokenizer
    parsed, problems = read_sft_rows(data, tok, PixelPolicy(side**2, side**2), 8192)
    assert not problems and len({r.length for r in parsed}) == 1, "rows must share one length"
    tokens_per_step = a.batch_size * parsed[0].length
    best: dict[str, dict] = {}
    run = 0
    for rep in range(a.repeats or spec["repeats"]):
        for iters in (short, long):
            for who in ("theirs", "ours") if rep % 2 else ("ours", "theirs"):
                _fresh()
                out = work / f"{name}-{who}-{run}"
                run += 1
                if who == "ours":
                    secs, peak, base = run_ours(model_dir, data, iters, a.batch_size, side, out)
                else:
                    secs, peak, base = run_theirs(model_dir, rows, iters, a.batch_size, out)
                rec = best.setdefault(f"{who}-{iters}", {"secs": [], "peak": peak,
                                                         "base": base})
                rec["secs"].append(secs)
                rec["peak"] = max(rec["peak"], peak)
                sample()
                print(f"  {name} {who:6s} {iters:3d} steps: {secs:7.2f} s, "
                      f"peak {peak / 1e6:8.1f} MB (weights {base / 1e6:.1f} MB)", flush=True)
    out = {"tokens_per_step": tokens_per_step}
    for who in ("ours", "theirs"):
        dt = median(best[f"{who}-{long}"]["secs"]) - median(best[f"{who}-{short}"]["secs"])
        rec = best[f"{who}-{long}"]
        out[who] = {"tokens_per_s": tokens_per_step * (long - short) / max(dt, 1e-9),
                    "peak": rec["peak"], "overhead": rec["peak"] - rec["base"]}
    out["speed_ratio"] = out["ours"]["tokens_per_s"] / out["theirs"]["tokens_per_s"]
    out["memory_ratio"] = out["ours"]["peak"] / out["theirs"]["peak"]
    out["overhead_ratio"] = out["ours"]["overhead"] / max(out["theirs"]["overhead"], 1)
    return out


# Per model: shape, image side and the two run lengths. MLX's CPU matmul on Linux is slow
# (~1 GFLOP/s here, ~17x below numpy), so the larger model gets small images and short runs.
MODELS = {
    "tiny": {"shape": {"hidden_size": 64, "num_layers": 2}, "side": 224, "short": 4,
             "long": 14, "repeats": 3},
    "large": {"shape": {"hidden_size": 1024, "num_layers": 4}, "side": 112, "short": 1,
              "long": 3, "repeats": 3},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=40, help="rows in the data set (> mlx-vlm's "
                   "32-row preprocessing cache, as any real set is)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--models", default="tiny,large", help="tiny (hidden 64 x 2 layers, 224 px), "
                   "large (hidden 1024 x 4 layers, 112 px)")
    p.add_argument("--repeats", type=int, default=None, help="override the per-model repeats")
    a = p.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # a processor kwargs notice, printed once per row
    results = {}
    with tempfile.TemporaryDirectory(prefix="sft_bench_") as tmp:
        work = Path(tmp)
        for name in a.models.split(","):
            spec = MODELS[name]
            model_dir = build_tiny_model(work / f"model-{name}", seed=0, **spec["shape"])
            print(f"{name}: {spec['shape']}, batch {a.batch_size}, {a.rows} rows, "
                  f"{spec['side']}px images, {spec['short']} vs {spec['long']} steps", flush=True)
            results[name] = measure(name, model_dir, work, a, spec)
    print()
    print("| model | tokens/step | ours tok/s | mlx-vlm tok/s | speed ratio | ours peak MB | "
          "mlx-vlm peak MB | memory ratio | overhead ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_step']} | {r['ours']['tokens_per_s']:.0f} | "
              f"{r['theirs']['tokens_per_s']:.0f} | {r['speed_ratio']:.2f} | "
              f"{r['ours']['peak'] / 1e6:.1f} | {r['theirs']['peak'] / 1e6:.1f} | "
              f"{r['memory_ratio']:.2f} | {r['overhead_ratio']:.2f} |")
    final = results.get("large") or next(iter(results.values()))
    result("sft_tokens_per_s_ratio", final["speed_ratio"], 1.0, ".3f")
    result("sft_peak_memory_ratio", final["memory_ratio"], 1.0, ".3f")


if __name__ == "__main__":
    run_main(main)

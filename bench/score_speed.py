"""Images/s of `qponder score` (reason and fast modes) against a plain `mlx_vlm.generate` loop.

Same process, same images, same prompt, same pixel policy (the baseline gets the images already
resized by it, so both see identical inputs), same token budget, greedy decoding in both. Timed
work includes loading each image from disk. Three models by default:

* float32: the tiny random model (hidden 64, 2 layers) and a larger random one (hidden 1024,
  4 layers); `score_reason_speedup` / `score_fast_speedup` are the larger model's;
* the Qwen2.5-VL-3B layout in bf16 and in mlx-community's 4-bit layout
  (`qponder_mlx/testing/real_layouts.py`: real config, tokenizer and vocabulary, depth and
  widths cut for CI), what users run: `score_reason_speedup_3b_bf16`, `..._3b_4bit`,
  `score_fast_speedup_3b_bf16`, `..._3b_4bit`, with the float32 rows' goals.

MLX's Linux CPU backend runs bf16 and 4-bit matmuls in its own kernels: measured here, a
120 x 256 x 151,936 matmul (the 3B fixture's head) takes ~20x (bf16) and ~200x (4-bit) the time
of float32 through OpenBLAS, so the 3B rows use fewer images and tokens (`SIZES`; every run
prints its settings). All these are Linux-CPU figures: on Apple silicon the GPU runs bf16 and
4-bit at full speed. On Linux preload OpenBLAS first (`. scripts/blas_env.sh`): with MLX's
reference BLAS the larger model takes ~12 s of prefill per image and the run goes past 30
minutes.

    . scripts/blas_env.sh; .venv/bin/python bench/score_speed.py   # ~10 min on 2 CPU cores
    .venv/bin/python bench/score_speed.py --flavour qwen2.5-vl-3b --dtype 4bit  # one model
    .venv/bin/python bench/score_speed.py --flavour random    # the float32 models only
    .venv/bin/python bench/score_speed.py --quick    # fewer images and tokens: smoke test

`--images` / `--max-tokens` / `--batch-size` given on the command line apply to every model;
left out, each model gets its own (`SIZES`).

Each path's row also shows its tokens and FLOPs per image and the speedup that FLOPs alone
would allow (`flops_per_image`), so a measured ratio can be read against the compute-bound one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlx.core as mx  # noqa: E402
from flavours import FLOAT32, add_model_args, fixture_root, model_runs  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from timing import interleaved, result, run_main  # noqa: E402

from qponder_mlx import generate as gen  # noqa: E402
from qponder_mlx.generate import SamplingConfig  # noqa: E402
from qponder_mlx.images import PixelPolicy, load_image  # noqa: E402
from qponder_mlx.model import load_model  # noqa: E402
from qponder_mlx.prompts import FAST_ANSWER_PREFIX, chat_messages  # noqa: E402
from qponder_mlx.scoring import ScoreConfig, Scorer  # noqa: E402
from qponder_mlx.testing import build_tiny_model  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "qponder_mlx" / "assets" / "cc0_mini" / "images"
MODELS = {"tiny": {"hidden_size": 64, "num_layers": 2},
          "larger": {"hidden_size": 1024, "num_layers": 4}}
GOAL_REASON, GOAL_FAST = 4.0, 20.0


@dataclass(frozen=True)
class Sizes:
    images: int
    max_tokens: int
    batch_size: int = 16


# Per dtype, so that each model's part takes ~2-5 min on 2 cores and the whole run ~10 min.
# Measured on this box (2 cores, OpenBLAS preloaded, 16 image tokens per image): float32
# 1024x4 ~1.3 s per image in the baseline at 64 tokens; the 3B fixture in bf16 ~0.07 s of
# prefill + ~0.06 s per decoded token, in 4-bit ~0.9 s + ~0.28 s per token, where batching the
# decode rows buys nothing (MLX's CPU quantized matmul costs the same per row at any batch).
# The float32 sizes are the recorded figures' (docs/benchmarks.md).
SIZES = {FLOAT32: Sizes(images=64, max_tokens=64), "bf16": Sizes(images=12, max_tokens=32),
         "4bit": Sizes(images=4, max_tokens=12)}
QUICK = {FLOAT32: Sizes(images=16, max_tokens=16), "bf16": Sizes(images=4, max_tokens=8),
         "4bit": Sizes(images=2, max_tokens=4)}


def make_images(folder: Path, n: int) -> list[Path]:
    """n distinct photos: the CC0 set, then its mirror images."""
    src = sorted(ASSETS.iterdir())
    out = []
    for i in range(n):
        img = Image.open(src[i % len(src)]).convert("RGB")
        if (i // len(src)) % 2:
            img = ImageOps.mirror(img)
        p = folder / f"img{i:03d}.png"
        img.save(p)
        out.append(p)
    return out


def _params(module) -> int:
    """Parameters of an mlx module (or a list of them)."""
    mods = module if isinstance(module, list) else [module]
    return sum(v.size for m in mods for _, v in tree_flatten(m.parameters()))


def flops_per_image(loaded, prompt: str, policy, path, decode_tokens: float, *,
                    shared_prefix: bool, answer_prefix: str = "") -> tuple[int, int, float]:
    """(prefill tokens run, decode tokens, FLOPs) for one image on one path.

    Matmul FLOPs: 2 x parameters per token for the language layers and the vision tower, plus
    the language model's attention scores (4 x layers x heads x head_dim x context per token),
    plus the output projection (2 x hidden x vocab) once per prefill and once per decode step
    (mlx-vlm's chunked prefill never evaluates the other positions' logits; nor do we). The
    shared prefix (the text before the image) is run once per run, not per image: not counted.
    """
    m = loaded.model
    lm = m.language_model
    args = lm.args
    head_dim = args.hidden_size // args.num_attention_heads
    attn = 4 * args.num_hidden_layers * args.num_attention_heads * head_dim
    layers = 2 * _params(lm.model.layers)
    head = 2 * args.hidden_size * args.vocab_size
    img = policy.resize(load_image(path))
    inputs = gen.encode(loaded.processor, [prompt + answer_prefix], [img])
    ids = inputs["input_ids"]
    n = ids.shape[1]
    start = gen.PrefixCache(m.config.image_token_id).length(ids) if shared_prefix else 0
    patches = inputs["pixel_values"].shape[0]
    flops = 2 * _params(m.vision_tower) * patches
    flops += sum(layers + attn * t for t in range(start, n)) + head
    k = decode_tokens
    flops += k * (layers + head) + attn * (k * n + k * (k - 1) / 2)
    return n - start, round(k), flops


def baseline(loaded, paths, prompt, policy, max_tokens):
    """The plain loop: one stock `mlx_vlm.generate` per image. Returns (seconds, tokens)."""
    from mlx_vlm import generate

    tokens = 0
    t0 = time.perf_counter()
    for p in paths:
        img = policy.resize(load_image(p))
        r = generate(loaded.model, loaded.processor, prompt, image=[img],
                     max_tokens=max_tokens, temperature=0.0, verbose=False)
        tokens += r.generation_tokens
    return time.perf_counter() - t0, tokens


def ours(loaded, paths, mode, policy, max_tokens, batch_size):
    scorer = Scorer(loaded, ScoreConfig(mode=mode, batch_size=batch_size, pixels=policy,
                                        sampling=SamplingConfig(max_tokens=max_tokens)))
    t0 = time.perf_counter()
    results = scorer.score(paths)
    dt = time.perf_counter() - t0
    bad = [r.error for r in results if r.error]
    if bad:
        raise SystemExit(f"scoring failed: {bad[0]}")
    return dt, sum(r.tokens for r in results)


def bench_model(name, model_dir, paths, sizes: Sizes, repeats: int, policy):
    loaded = load_model(str(model_dir))
    prompt = loaded.tokenizer.apply_chat_template(chat_messages(), tokenize=False,
                                                  add_generation_prompt=True)
    # Warm up every path once (kernel compilation, lazy imports) before any timing.
    baseline(loaded, paths[:1], prompt, policy, 4)
    ours(loaded, paths[:2], "reason", policy, 4, 2)
    ours(loaded, paths[:2], "fast", policy, 4, 2)

    n = len(paths)
    tokens = {}  # generated tokens of each path's run (greedy: the same every repeat)

    def timed(key, fn):
        def run() -> float:
            mx.clear_cache()
            dt, tokens[key] = fn()
            return dt  # the path's own seconds
        return run

    # Interleaved repeats, so a noisy neighbour on the machine hits every measure alike.
    times = interleaved({
        "baseline": timed("baseline", lambda: baseline(loaded, paths, prompt, policy,
                                                       sizes.max_tokens)),
        "reason": timed("reason", lambda: ours(loaded, paths, "reason", policy,
                                               sizes.max_tokens, sizes.batch_size)),
        "fast": timed("fast", lambda: ours(loaded, paths, "fast", policy, sizes.max_tokens,
                                           sizes.batch_size)),
    }, repeats=repeats)
    out = {}
    for key, runs in times.items():
        dt = statistics.median(runs)
        out[key] = (n / dt, dt, tokens[key])
    base = out["baseline"][0]
    per = {key: tok / n for key, tok in tokens.items()}  # generated tokens per image
    flops = {
        "baseline": flops_per_image(loaded, prompt, policy, paths[0], per["baseline"],
                                    shared_prefix=False),
        "reason": flops_per_image(loaded, prompt, policy, paths[0], per["reason"],
                                  shared_prefix=True),
        "fast": flops_per_image(loaded, prompt, policy, paths[0], 0, shared_prefix=True,
                                answer_prefix=FAST_ANSWER_PREFIX),
    }
    print(f"\n[{name}] {n} images, {policy.token_count((224, 224))} image tokens each, "
          f"prompt {len(loaded.tokenizer.encode(prompt))} tokens, "
          f"max_tokens {sizes.max_tokens}, batch {sizes.batch_size}, "
          f"median of {repeats}")
    print(f"{'':10}{'img/s':>9}{'seconds':>9}{'gen tokens':>12}{'speedup':>9}"
          f"{'prefill tok':>13}{'decode tok':>12}{'GFLOP/img':>11}{'FLOP limit':>12}")
    for key, (ips, dt, tok) in out.items():
        pre, dec, f = flops[key]
        print(f"{key:10}{ips:9.2f}{dt:9.2f}{tok:12d}{ips / base:9.2f}x{pre:13d}{dec:12d}"
              f"{f / 1e9:11.3f}{flops['baseline'][2] / f:11.2f}x")
    print("(FLOP limit: the speedup if every path ran at the same FLOP/s; GFLOP/img counts "
          "prefill after any shared prefix and the measured decode tokens)", flush=True)
    return out["reason"][0] / base, out["fast"][0] / base


def sizes_for(dtype: str, args) -> Sizes:
    """The dtype's own sizes (QUICK with --quick), with what the command line set on top."""
    sizes = (QUICK if args.quick else SIZES)[dtype]
    sizes = replace(sizes, **{k: v for k, v in (("images", args.images),
                                                ("max_tokens", args.max_tokens),
                                                ("batch_size", args.batch_size))
                              if v is not None})
    return replace(sizes, batch_size=min(sizes.batch_size, sizes.images))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=None, help="default: per model, SIZES")
    ap.add_argument("--max-tokens", type=int, default=None, help="default: per model, SIZES")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 16")
    ap.add_argument("--repeats", type=int, default=3, help="median of this many")
    ap.add_argument("--min-pixels", type=int, default=56 * 56)
    ap.add_argument("--max-pixels", type=int, default=112 * 112)
    ap.add_argument("--quick", action="store_true", help="fewer images and tokens (QUICK)")
    add_model_args(ap)
    args = ap.parse_args()
    runs = model_runs(ap, args)
    policy = PixelPolicy(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    sizes = {run: sizes_for(run.dtype, args) for run in runs}
    for run in runs:
        s = sizes[run]
        print(f"settings {run.label}: {s.images} images, max_tokens {s.max_tokens}, "
              f"batch {s.batch_size}, {args.repeats} repeats, pixels {args.min_pixels}-"
              f"{args.max_pixels}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="qponder-bench-"))
    try:
        (tmp / "images").mkdir()
        paths = make_images(tmp / "images", max(s.images for s in sizes.values()))
        with fixture_root(args) as root:
            for run in runs:
                s = sizes[run]
                if run.real:
                    reason, fast = bench_model(run.label, run.model_dir(root),
                                               paths[:s.images], s, args.repeats, policy)
                    result(f"score_reason_speedup{run.suffix}", reason, GOAL_REASON)
                    result(f"score_fast_speedup{run.suffix}", fast, GOAL_FAST)
                    continue
                ratios = {}
                for name, shape in MODELS.items():
                    model_dir = build_tiny_model(tmp / name, seed=0, **shape)
                    ratios[name] = bench_model(name, model_dir, paths[:s.images], s,
                                               args.repeats, policy)
                print(f"\ntiny model: reason {ratios['tiny'][0]:.2f}x, "
                      f"fast {ratios['tiny'][1]:.2f}x")
                result("score_reason_speedup", ratios["larger"][0], GOAL_REASON)
                result("score_fast_speedup", ratios["larger"][1], GOAL_FAST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)

"""GRPO step time and peak memory: ours vs mlx-vlm 0.7.10's GRPO `Trainer`, side by side.

Both sides run the same optimizer steps on the same model: by default the float32 random
Qwen2.5-VL (a tiny one, hidden 64 / 2 layers, and a larger one, hidden 1024 / 4 layers, whose
figures are `grpo_step_speedup` / `grpo_peak_memory_ratio`), then what users run, the
Qwen2.5-VL-3B layout in bf16 and in mlx-community's 4-bit layout (`qponder_mlx/testing/
real_layouts.py`: real config, tokenizer and vocabulary, depth and widths cut for CI;
`grpo_step_speedup_3b_bf16`, `grpo_step_speedup_3b_4bit` and their memory ratios, same goals).
float32: B=2 CC0 photos per step (224x224, resized by one PixelPolicy so both see identical
pixels and prompt tokens), G=8 samples per photo, up to 64 new tokens at temperature 1,
beta=0.04, the same LoRA (rank, alpha, targets, seeded A
matrices), AdamW lr 1e-5, bnpo/dapo token-mean loss, clip epsilon 0.2, and the same reward:
one Python function (format + Laplace accuracy, no judge) wrapped in each trainer's interface.

* ours:     `qponder_mlx.grpo.step.grpo_step` — one prefill per photo, the G rows decoded as a
            batch; the KL reference is the policy with its adapters switched off.
* mlx-vlm:  its public `mlx_vlm.trainer.api.Trainer(..., algorithm="grpo").train()` running
            exactly 1 + K iterations (one rollout + one optimizer update each); it needs a
            second, frozen copy of the model as the KL reference (part of what is measured).

Step time = wall time of one optimizer step, rollout + rewards + update (mlx-vlm: between two
of its per-iteration reports, so its rollout, done in the data iterator, is included). Each side
warms up one step, then K steps are timed; the median step is reported (and the process's
CPU time over the same steps, steadier on a shared machine). Peak memory =
`mx.get_peak_memory()` over those K steps after `mx.reset_peak_memory()`, with only that side's
models resident (weights + activations). The goal: >= 3x faster and <= 0.7x peak memory.

MLX's Linux CPU backend runs bf16 and 4-bit matmuls in its own kernels: measured here, a
120 x 256 x 151,936 matmul (the 3B fixture's head) takes ~20x (bf16) and ~200x (4-bit) the time
of float32 through OpenBLAS, so the 3B runs take fewer photos, samples, tokens and steps
(`SETUPS`; each run prints its settings). All these are Linux-CPU figures: on Apple silicon the
GPU runs bf16 and 4-bit at full speed.

    .venv/bin/python bench/grpo_speed.py     # float32, then 3B bf16 (~3 min), 4-bit (~8 min)
    .venv/bin/python bench/grpo_speed.py --flavour qwen2.5-vl-3b --dtype 4bit   # one model
    .venv/bin/python bench/grpo_speed.py --flavour random [--models tiny,large] [--steps 2]
    .venv/bin/python bench/grpo_speed.py --reference-blas    # keep MLX's own BLAS (slow)

`--steps`, `--batch`, `--group-size` and `--max-new` given on the command line apply to every
model; left out, each model gets its own (`SETUPS`). `--cache-dir` keeps the built 3B fixtures.

On Linux the script re-runs itself with a system OpenBLAS preloaded (see OPENBLAS below).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only, never the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# MLX's Linux CPU wheel links netlib's reference BLAS: ~1 GFLOPS for a float32 matmul on this
# box, which makes the 1024-wide model take hours. A system OpenBLAS preloaded in its place
# gives ~24 GFLOPS. Both sides run on the same BLAS, so the ratios stay side by side; on macOS
# MLX uses Accelerate/Metal and nothing changes.
OPENBLAS = ("/lib/x86_64-linux-gnu/libopenblas.so.0", "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
            "/lib/aarch64-linux-gnu/libopenblas.so.0", "/usr/lib64/libopenblas.so.0")


def _reexec_with_openblas() -> None:
    if (sys.platform != "linux" or "--reference-blas" in sys.argv
            or "openblas" in os.environ.get("LD_PRELOAD", "")):
        return
    lib = next((p for p in OPENBLAS if os.path.exists(p)), None)
    if lib is None:
        return
    print(f"re-running with LD_PRELOAD={lib} (pass --reference-blas to keep MLX's own BLAS)",
          flush=True)
    env = dict(os.environ, LD_PRELOAD=f"{lib} {os.environ.get('LD_PRELOAD', '')}".strip())
    # One BLAS thread: on a shared 2-core box a second, spinning thread adds system time and
    # noise without adding speed (measured: same GFLOPS, less sys time).
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":
    _reexec_with_openblas()

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from flavours import FLOAT32, ModelRun, add_model_args, fixture_root, model_runs  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from timing import note_repeats, result, run_main  # noqa: E402

from qponder_mlx import generate as gen  # noqa: E402
from qponder_mlx.grpo.config import GRPOConfig  # noqa: E402
from qponder_mlx.grpo.rewards import RewardConfig, combine  # noqa: E402
from qponder_mlx.grpo.step import grpo_step  # noqa: E402
from qponder_mlx.images import PixelPolicy, load_image  # noqa: E402
from qponder_mlx.labels import read_labels  # noqa: E402
from qponder_mlx.model import load_model  # noqa: E402
from qponder_mlx.prompts import chat_messages, parse_response  # noqa: E402
from qponder_mlx.testing import build_tiny_model  # noqa: E402
from qponder_mlx.train.config import LoraConfig  # noqa: E402
from qponder_mlx.train.loop import lr_schedule  # noqa: E402
from qponder_mlx.train.lora import attach_lora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / "qponder_mlx" / "assets" / "cc0_mini" / "labels.jsonl"
MODELS = {"tiny": (64, 2), "large": (1024, 4)}  # name -> (hidden_size, num_layers)
SIDE = 224  # photo side in pixels: 64 image tokens after the 2x2 merge
GOAL_SPEEDUP, GOAL_MEMORY = 3.0, 0.7
GB = 1e9


@dataclass
class Setup:
    group_size: int = 8
    max_new: int = 64
    beta: float = 0.04
    batch: int = 2  # photos per step
    learning_rate: float = 1e-5
    epsilon: float = 0.2
    seed: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)  # rank 16, alpha 32, 7 LM linears
    rewards: RewardConfig = field(default_factory=lambda: RewardConfig(consistency_weight=0.0))
    steps: int = 3  # timed steps per side (after 1 warm-up); the median counts


# Per dtype. The float32 setup is the recorded figures' (docs/benchmarks.md). At CI widths the
# 3B fixture's cost is its 151,936-row head (hidden 256), and mlx-vlm's loss takes those logits
# at every position of prompt and completion, for the policy and for the reference, one
# completion at a time: measured on this box's 2 cores (busy), one mlx-vlm step took ~35 s of
# CPU in bf16 at B=1 x G=4 and ~210 s in 4-bit at B=1 x G=2 (ours: ~3 s and ~11 s). So 4-bit
# runs the smallest group and one timed step after the warm-up (fewer than timing.MIN_REPEATS:
# the run says so), and still takes ~8 min on 2 cores.
SETUPS = {FLOAT32: Setup(),
          "bf16": Setup(batch=1, group_size=4, max_new=8),
          "4bit": Setup(batch=1, group_size=2, max_new=4, steps=1)}


@dataclass
class Side:
    step_s: list[float]  # the K timed steps, wall clock
    cpu_s: list[float]  # the same steps, CPU time of this process (all threads)
    peak_gb: float
    loaded_gb: float  # active memory once the side's models (and LoRA) are in place
    completion_len: float  # mean generated tokens per completion over the timed steps
    split: dict[str, float]  # mean seconds per part of a step

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_s)


def photos(setup: Setup) -> tuple[list[Image.Image], list[float]]:
    """`batch` CC0 photos with different MOS, centre-cropped and resized to SIDE x SIDE."""
    samples, _ = read_labels(str(LABELS))
    samples = sorted(samples, key=lambda s: s.mos)
    picks = [samples[round(i * (len(samples) - 1) / max(setup.batch - 1, 1))]
             for i in range(setup.batch)]
    pixels = PixelPolicy(min_pixels=SIDE * SIDE, max_pixels=SIDE * SIDE)
    imgs = [pixels.resize(ImageOps.fit(load_image(s.image), (SIDE, SIDE))) for s in picks]
    assert all(im.size == (SIDE, SIDE) for im in imgs), [im.size for im in imgs]
    return imgs, [s.mos for s in picks]


def shared_reward(setup: Setup):
    """The one reward both trainers call: texts + MOS per completion -> (total, components)."""
    def reward(texts: list[str], mos: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        parsed = [parse_response(t) for t in texts]
        return combine(parsed, mos, setup.group_size, setup.rewards)
    return reward


def free_all() -> None:
    gc.collect()
    mx.clear_cache()


def prompt_text(processor) -> str:
    return processor.tokenizer.apply_chat_template(chat_messages(), tokenize=False,
                                                   add_generation_prompt=True)


# ------------------------------------------------------------------------------------ ours


def run_ours(model_dir: Path, imgs, mos, setup: Setup, steps: int) -> Side:
    loaded = load_model(str(model_dir))
    model, processor = loaded.model, loaded.processor
    mx.random.seed(setup.seed)  # LoRA A matrices: the same draw as the baseline's
    attach_lora(model, setup.lora)
    mx.eval(model.parameters())
    loaded_gb = mx.get_active_memory() / GB
    cfg = GRPOConfig(data="bench", batch_size=setup.batch, group_size=setup.group_size,
                     beta=setup.beta, max_completion_length=setup.max_new, temperature=1.0,
                     top_p=1.0, loss_type="dapo", epsilon_low=setup.epsilon,
                     epsilon_high=setup.epsilon, learning_rate=setup.learning_rate,
                     lr_schedule="constant", rewards=setup.rewards, lora=setup.lora,
                     seed=setup.seed)
    optimizer = optim.AdamW(learning_rate=lr_schedule(cfg.learning_rate, 1 + steps,
                                                      kind="constant"))
    reward = shared_reward(setup)
    reward_fn = lambda ro, parsed, mos_rows: reward(ro.texts, mos_rows)  # noqa: E731
    prompt = prompt_text(processor)

    mx.random.seed(setup.seed)
    grpo_step(model, processor, prompt, imgs, mos, cfg, optimizer, reward_fn)  # warm-up
    mx.reset_peak_memory()
    times, cpu, metrics = [], [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        res = grpo_step(model, processor, prompt, imgs, mos, cfg, optimizer, reward_fn)
        mx.eval(model.trainable_parameters(), optimizer.state)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        metrics.append(res.metrics)
    peak = mx.get_peak_memory() / GB
    split = {k: statistics.mean(m[f"time_{k}"] for m in metrics)
             for k in ("rollout", "reward", "update")}
    side = Side(times, cpu, peak, loaded_gb,
                statistics.mean(m["completion_length"] for m in metrics), split)
    del model, processor, loaded, optimizer, res
    return side


# ------------------------------------------------------------------------------- mlx-vlm


class _Clock:
    """mlx-vlm TrainingCallback: a timestamp and metrics per iteration report (every step)."""

    def __init__(self):
        self.stamps: list[float] = []
        self.cpu: list[float] = []
        self.reports: list[dict] = []

    def on_train_loss_report(self, info: dict) -> None:
        self.stamps.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.reports.append(info)
        if info["iteration"] == 1:  # the warm-up step is done: measure from here
            mx.reset_peak_memory()

    def on_val_loss_report(self, info: dict) -> None:
        pass


def run_mlx_vlm(model_dir: Path, imgs, mos, setup: Setup, steps: int, tmp: Path,
                verbose: bool) -> Side:
    from mlx_vlm.trainer.api import Trainer
    from mlx_vlm.trainer.peft import get_peft_model
    from mlx_vlm.trainer.vlm.grpo.config import GRPOTrainingArgs

    loaded = load_model(str(model_dir))
    policy, processor = loaded.model, loaded.processor
    reference = load_model(str(model_dir)).model  # beta > 0 needs a second, frozen copy
    mx.random.seed(setup.seed)
    get_peft_model(policy, list(setup.lora.target_modules), rank=setup.lora.rank,
                   alpha=setup.lora.alpha, dropout=0.0, freeze=True, verbose=False)
    mx.eval(policy.parameters(), reference.parameters())
    loaded_gb = mx.get_active_memory() / GB
    # Same stop tokens as ours (Qwen's generation config: <|im_end|> and <|endoftext|>); the
    # tokenizer alone names only <|im_end|>, which would give the baseline longer completions.
    # (transformers' __setattr__ refuses a list under an *_ids name; the GRPO code only reads it)
    object.__setattr__(processor.tokenizer, "eos_token_ids",
                       sorted(gen.stop_tokens(policy, processor.tokenizer).stop))

    reward = shared_reward(setup)

    def qponder_reward(*, completions, answer, **_):
        return reward(list(completions), np.asarray(answer, dtype=np.float64))[0].tolist()

    args = GRPOTrainingArgs(
        batch_size=setup.batch, iters=1 + steps, steps_per_report=1, steps_per_eval=None,
        steps_per_save=10 ** 9, adapter_file=str(tmp / "mlx_vlm_adapters.safetensors"),
        group_size=setup.group_size, beta=setup.beta, epsilon=setup.epsilon,
        max_completion_length=setup.max_new, temperature=1.0, top_p=1.0, top_k=0,
        grpo_loss_type="bnpo", compile=False)
    prompt = prompt_text(processor)
    rows = [{"prompt": prompt, "image": im, "answer": m} for im, m in zip(imgs, mos)]
    clock = _Clock()
    optimizer = optim.AdamW(learning_rate=lr_schedule(setup.learning_rate, 1 + steps,
                                                      kind="constant"))
    trainer = Trainer(policy, args, task="vlm", algorithm="grpo", train_dataset=rows,
                      processing_class=processor, optimizer=optimizer,
                      reference_model=reference, reward_funcs=[qponder_reward],
                      reward_weights=[1.0], dataset_config={"apply_chat_template": False},
                      training_callback=clock, seed=setup.seed)
    # Same work on both sides: the baseline's prepared prompt must be ours, token for token.
    ours = gen.encode(processor, [prompt], imgs[:1])
    theirs = trainer.train_dataset[0]["inputs"]
    assert theirs["input_ids"].tolist() == ours["input_ids"][0].tolist(), "prompt tokens differ"
    assert theirs["pixel_values"].shape == ours["pixel_values"].shape, "pixels differ"

    mx.random.seed(setup.seed)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet, (contextlib.nullcontext() if verbose
                 else contextlib.redirect_stderr(io.StringIO())):
        trainer.train()
    peak = mx.get_peak_memory() / GB  # reset by the callback after the warm-up iteration
    assert len(clock.stamps) == 1 + steps, f"{len(clock.stamps)} reports for {1 + steps} iters"
    times = list(np.diff(clock.stamps))
    timed = clock.reports[1:]
    split = {"rollout": statistics.mean(r["data_time_per_step"] for r in timed),
             "update": statistics.mean(r["step_time"] for r in timed)}
    side = Side(times, list(np.diff(clock.cpu)), peak, loaded_gb,
                statistics.mean(float(r["train_average_generated_tokens"]) for r in timed),
                split)
    del trainer, policy, reference, processor, loaded, optimizer
    return side


# ------------------------------------------------------------------------------------ main


def mlx_vlm_version() -> str:
    from importlib.metadata import version

    return version("mlx-vlm")


def blas_in_use() -> str:
    """Which BLAS MLX's CPU matmuls resolve to in this process."""
    if sys.platform == "darwin":
        return "Accelerate"
    pre = [p for p in os.environ.get("LD_PRELOAD", "").split() if "openblas" in p]
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    if pre and os.path.basename(os.path.realpath(pre[0])) in maps:
        return f"OpenBLAS, preloaded ({os.path.realpath(pre[0])})"
    return "MLX's bundled reference BLAS (slow)"


def fmt_split(split: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in split.items())


def bench_model(name: str, model_dir: Path, tmp: Path, setup: Setup, verbose: bool):
    imgs, mos = photos(setup)
    steps = setup.steps
    note_repeats(steps, "timed steps")

    free_all()
    before = mx.get_active_memory() / GB
    ours = run_ours(model_dir, imgs, mos, setup, steps)
    free_all()
    between = mx.get_active_memory() / GB
    base = run_mlx_vlm(model_dir, imgs, mos, setup, steps, tmp, verbose)
    free_all()

    speedup = base.median_s / ours.median_s
    cpu_speedup = base.median_cpu_s / ours.median_cpu_s
    ratio = ours.peak_gb / base.peak_gb
    print(f"== {name}: B={setup.batch} x G={setup.group_size}, {setup.max_new} new tokens, "
          f"beta={setup.beta}, {steps} timed steps")
    print(f"  active memory before ours {before:.3f} GB, loaded {ours.loaded_gb:.3f} GB; "
          f"before mlx-vlm {between:.3f} GB, loaded (policy + reference) "
          f"{base.loaded_gb:.3f} GB")
    for label, s in (("ours   ", ours), ("mlx-vlm", base)):
        steps_txt = " ".join(f"{t:.2f}" for t in s.step_s)
        print(f"  {label} {s.median_s:7.2f} s/step (steps {steps_txt}; {fmt_split(s.split)}; "
              f"CPU {s.median_cpu_s:.2f} s) peak {s.peak_gb:.3f} GB, "
              f"{s.completion_len:.1f} tokens/completion")
    print(f"  {name}: speedup {speedup:.2f}x (CPU time {cpu_speedup:.2f}x; goal {GOAL_SPEEDUP}), "
          f"peak memory ratio {ratio:.3f} (goal {GOAL_MEMORY})", flush=True)
    return speedup, ratio


def setup_for(run: ModelRun, args) -> Setup:
    """The dtype's own setup, with what the command line set on top."""
    given = {k: v for k, v in (("steps", args.steps), ("batch", args.batch),
                               ("group_size", args.group_size), ("max_new", args.max_new))
             if v is not None}
    return replace(SETUPS[run.dtype], **given)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per side (after 1 warm-up); the median counts "
                         "(default: per model, SETUPS)")
    ap.add_argument("--batch", type=int, default=None, help="photos per step (default: SETUPS)")
    ap.add_argument("--group-size", type=int, default=None,
                    help="samples per photo (default: SETUPS)")
    ap.add_argument("--max-new", type=int, default=None,
                    help="new tokens per sample at most (default: SETUPS)")
    ap.add_argument("--models", default="tiny,large",
                    help=f"float32 random models: a subset of {','.join(MODELS)}")
    ap.add_argument("--verbose", action="store_true", help="show mlx-vlm's own progress output")
    ap.add_argument("--reference-blas", action="store_true",
                    help="do not preload a system OpenBLAS on Linux (very slow for 'large')")
    add_model_args(ap)
    args = ap.parse_args()
    runs = model_runs(ap, args)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown or not names:
        sys.exit(f"--models: unknown {unknown} — choose from {', '.join(MODELS)}")
    setups = {run: setup_for(run, args) for run in runs}
    for n in ("steps", "batch", "group_size", "max_new"):
        if any(getattr(s, n) < 1 for s in setups.values()):
            sys.exit(f"--{n.replace('_', '-')} must be >= 1")

    print(f"mlx {mx.__version__}, mlx-vlm {mlx_vlm_version()}, BLAS {blas_in_use()}")
    for run, s in setups.items():
        print(f"settings {run.label}: B={s.batch} photos x G={s.group_size} samples, "
              f"{s.max_new} new tokens, {s.steps} timed steps", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, fixture_root(args) as root:
        for run, setup in setups.items():
            if run.real:
                speedup, ratio = bench_model(run.label, run.model_dir(root), Path(tmp), setup,
                                             args.verbose)
                result(f"grpo_step_speedup{run.suffix}", speedup, GOAL_SPEEDUP)
                result(f"grpo_peak_memory_ratio{run.suffix}", ratio, GOAL_MEMORY, ".3f")
                continue
            results = {}
            for name in names:
                hidden, layers = MODELS[name]
                model_dir = build_tiny_model(Path(tmp) / name, hidden_size=hidden,
                                             num_layers=layers)
                results[name] = bench_model(f"{name} (float32, hidden {hidden}, {layers} "
                                            "layers)", model_dir, Path(tmp), setup,
                                            args.verbose)
            final = results.get("large") or results[names[-1]]
            result("grpo_step_speedup", final[0], GOAL_SPEEDUP)
            result("grpo_peak_memory_ratio", final[1], GOAL_MEMORY, ".3f")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    run_main(main)

"""`qponder train --stage sft|grpo`: LoRA/QLoRA training runs from a TOML config and flags.

Every option lives in a typed config dataclass (SFTConfig, GRPOConfig); the flags below are the
common ones and `--set key=value` reaches any other field (dotted keys for nested ones, e.g.
`--set lora.dropout=0.05`). Precedence: defaults < the run folder's saved config (with
--resume) < --config FILE < flags.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
from qponder_mlx.cli.common import fail

from qponder_mlx.model import DEFAULT_MODEL

STAGES = ("sft", "grpo")


def register(app: typer.Typer) -> None:
    app.command("train")(train)


def _config_class(stage: str):
    if stage == "sft":
        from qponder_mlx.train.config import SFTConfig

        return SFTConfig
    from qponder_mlx.grpo.config import GRPOConfig

    return GRPOConfig


def _runner(stage: str):
    if stage == "sft":
        from qponder_mlx.train.sft import run_sft

        return run_sft
    from qponder_mlx.grpo.trainer import run_grpo

    return run_grpo


def train(
    stage: str = typer.Option("sft", help="sft (cold start on distilled answers) or grpo."),
    config: Path | None = typer.Option(None, help="TOML file with any config fields."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its "
                                "latest checkpoint (exactly where it stopped)."),
    model: str | None = typer.Option(None, help="Base model: repo id or folder, float or "
                                     "already quantized.", show_default=DEFAULT_MODEL),
    data: Path | None = typer.Option(None, help="Training data (sft: `qponder distill` JSONL; "
                                     "grpo: a label file)."),
    val_data: Path | None = typer.Option(None, help="sft: validation JSONL (rows with mos also "
                                         "give SRCC/PLCC)."),
    out: Path | None = typer.Option(None, help="Run folder (checkpoints, adapters, metrics).",
                                    show_default="runs/sft or runs/grpo"),
    adapter: Path | None = typer.Option(None, help="grpo: the SFT adapter folder to start from."),
    iters: int | None = typer.Option(None, help="Optimizer steps.",
                                     show_default="sft 1000, grpo 200"),
    batch_size: int | None = typer.Option(None, help="Rows (sft) or images (grpo) per step.",
                                          show_default="sft 4, grpo 2"),
    grad_accum: int | None = typer.Option(None, "--grad-accum", "--grad-accumulation-steps",
                                          help="sft: micro-batches per optimizer step.",
                                          show_default="1"),
    learning_rate: float | None = typer.Option(None, help="Peak learning rate (AdamW).",
                                               show_default="sft 1e-4, grpo 1e-5"),
    warmup: int | None = typer.Option(None, help="Linear warmup steps.",
                                      show_default="sft 5 % of --iters, at most 50; grpo 0"),
    lora_rank: int | None = typer.Option(None, help="LoRA rank.", show_default="16"),
    lora_alpha: float | None = typer.Option(None, help="LoRA alpha (scale = alpha / rank).",
                                            show_default="32"),
    lora_dropout: float | None = typer.Option(None, help="LoRA dropout.", show_default="0"),
    quantize_base: int | None = typer.Option(None, help="QLoRA: quantize a float base to 4 "
                                             "(or 8) bits in memory.",
                                             show_default="off: train on the base as loaded"),
    grad_checkpoint: bool | None = typer.Option(None, "--grad-checkpoint/--no-grad-checkpoint",
                                                help="Recompute layers in backward (less "
                                                "memory, slower).",
                                                show_default="no-grad-checkpoint"),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len", "--max-seq-length",
                                           help="sft: skip longer rows (tokens).",
                                           show_default="2048"),
    min_pixels: int | None = typer.Option(None, help="Smallest pixel count the model sees.",
                                          show_default="100352"),
    max_pixels: int | None = typer.Option(None, help="Largest pixel count the model sees.",
                                          show_default="401408"),
    seed: int | None = typer.Option(None, help="Seed for LoRA init, data order, dropout.",
                                    show_default="0"),
    set_: list[str] | None = typer.Option(None, "--set", help="Any config field: key=value "
                                          "(repeatable; dotted keys for nested fields)."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress",
                                         help="Show the progress bar.",
                                         show_default="progress"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the predicted peak memory "
                                 "(weights, LoRA + AdamW, activations, KV caches; with and "
                                 "without --grad-checkpoint) and the Mac memory sizes it fits, "
                                 "then exit. Reads config.json and the tokenizer, no weights."),
) -> None:
    """Train a LoRA/QLoRA adapter (SFT cold start, then GRPO) into a run folder.

    The run folder gets config.json, metrics.jsonl, curves.html, checkpoints/ and adapters/ (load
    it with `--adapter RUN/adapters`).

    Example: qponder train --stage sft --data sft.jsonl --out runs/sft --iters 200
    """
    from qponder_mlx.labels import LabelError
    from qponder_mlx.model import ModelLoadError
    from qponder_mlx.train.checkpoint import CheckpointError
    from qponder_mlx.train.config import (
        CONFIG_FILE,
        ConfigError,
        load_config,
        parse_set_flags,
        read_config_file,
    )
    from qponder_mlx.train.data_order import DataOrderError
    from qponder_mlx.train.lora import AdapterError
    from qponder_mlx.train.runner import RunStopped
    from qponder_mlx.train.sft_rows import SFTDataError

    if stage not in STAGES:
        fail(f"--stage {stage!r}: expected one of {', '.join(STAGES)}")
    cls = _config_class(stage)
    flags = {
        "model": model, "data": data, "val_data": val_data, "out": out, "adapter": adapter,
        "iters": iters, "batch_size": batch_size, "grad_accum": grad_accum,
        "learning_rate": learning_rate, "warmup": warmup, "lora.rank": lora_rank,
        "lora.alpha": lora_alpha, "lora.dropout": lora_dropout, "quantize_base": quantize_base,
        "grad_checkpoint": grad_checkpoint, "max_seq_len": max_seq_len,
        "min_pixels": min_pixels, "max_pixels": max_pixels, "seed": seed,
        "progress": progress,
    }
    overrides = {k: str(v) if isinstance(v, Path) else v for k, v in flags.items()
                 if v is not None}
    try:
        overrides.update(parse_set_flags(set_))
        cfg = load_config(cls, config, overrides)
        saved = Path(cfg.out) / CONFIG_FILE
        if resume and saved.exists():
            # The run's own settings are the base; the file and flags given now still win.
            cfg = load_config(cls, config, overrides, base=read_config_file(saved))
        cfg.validate()
    except ConfigError as e:
        fail(str(e))

    if dry_run:
        from qponder_mlx.train.memory_plan import PlanError, plan_for_config, render

        try:
            p, title = plan_for_config(cfg, stage)
        except PlanError as e:
            fail(str(e))
        typer.echo(render(p, title))
        return

    run = _runner(stage)
    try:
        run_dir = run(cfg, resume=resume)
    except (ConfigError, SFTDataError, DataOrderError, CheckpointError, AdapterError,
            ModelLoadError, LabelError, FloatingPointError) as e:
        fail(str(e))
    except RunStopped as e:
        typer.echo(f"stopped at step {e.step}; checkpoint saved — resume with: qponder train "
                   f"--stage {stage} --out {shlex.quote(str(cfg.out))} --resume")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:  # a second Ctrl-C: stopped mid-step, the last checkpoint stands
        typer.secho(f"interrupted — continue from the last checkpoint with: qponder train "
                    f"--stage {stage} --out {shlex.quote(str(cfg.out))} --resume", err=True,
                    fg=typer.colors.YELLOW)
        raise typer.Exit(130) from None
    except OSError as e:  # disk full, read-only --out: one line, the checkpoints stand
        from qponder_mlx.safe_paths import os_error_reason, shown

        fail(f"--out {shown(cfg.out)}: cannot write ({os_error_reason(e)}: "
             f"{shown(e.filename or '')}) — checkpoints saved before are intact; free space, "
             f"then continue with: qponder train --stage {stage} --out "
             f"{shlex.quote(str(cfg.out))} --resume")
    typer.echo(f"done: adapter in {Path(run_dir) / 'adapters'} (use --adapter with eval/score); "
               f"metrics in {Path(run_dir) / 'metrics.jsonl'}, curves in "
               f"{Path(run_dir) / 'curves.html'}")

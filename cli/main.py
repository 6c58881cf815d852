"""`qponder`: the command-line face of qponder-mlx.

Each command parses flags, calls one library function and prints a short summary; the work lives
in `qponder_mlx`. Errors users can fix are one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from qponder_mlx.cli.common import check_scoring_flags, fail, load_scorer, read_samples

from qponder_mlx.model import DEFAULT_MODEL

ROOT_HELP = """Train, run and ship reasoning image-quality models with MLX.

Example: qponder score ~/Pictures --mode fast --db photos.sqlite --report photos.html
"""
app = typer.Typer(add_completion=False, no_args_is_help=True, help=ROOT_HELP)
dev = typer.Typer(no_args_is_help=True, help="Developer tools: an offline tiny model.")
app.add_typer(dev, name="dev")


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    typer.echo(f"qponder-mlx {v('qponder-mlx')} (mlx {v('mlx')}, mlx-vlm {v('mlx-vlm')}, "
               f"mlx-lm {v('mlx-lm')})")
    raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version,
                                       is_eager=True, help="Print the versions and exit.")) -> None:
    """Train, run and ship reasoning image-quality models with MLX."""


@dev.command("tiny-model")
def tiny_model(
    path: Path = typer.Argument(..., help="Folder to write the model into."),
    seed: int = typer.Option(0, help="RNG seed: same seed, same weights."),
    hidden_size: int = typer.Option(64, help="Language-model width (multiple of 16)."),
    num_layers: int = typer.Option(2, help="Language-model layers."),
    vocab_size: int = typer.Option(640, help="BPE vocabulary target."),
    vision_hidden: int = typer.Option(64, help="Vision-tower width (multiple of 16)."),
    vision_depth: int = typer.Option(2, help="Vision-tower blocks."),
) -> None:
    """Write a tiny random Qwen2.5-VL that every command accepts, so you can try qponder offline.

    Example: qponder dev tiny-model tiny
    """
    from qponder_mlx.testing import build_tiny_model

    try:
        out = build_tiny_model(path, seed=seed, hidden_size=hidden_size, num_layers=num_layers,
                               vocab_size=vocab_size, vision_hidden=vision_hidden,
                               vision_depth=vision_depth)
    except ValueError as e:
        fail(f"qponder dev tiny-model: {e}")
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    typer.echo(f"tiny Qwen2.5-VL written to {out} ({size:.1f} MB)")


@app.command("eval")
def eval_cmd(
    data: Path = typer.Option(..., help="Label file (any format `load_labels` reads)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Repo id or folder."),
    adapter: Path | None = typer.Option(None, "--adapter", "--adapter-path",
                                        help="LoRA adapter folder (mlx-vlm format)."),
    bundle: Path | None = typer.Option(None, help="A verified qponder bundle instead of --model."),
    images_root: Path | None = typer.Option(None, help="Folder the label paths are relative to."),
    format: str = typer.Option("auto", help="Label format (auto, koniq, kadid, livec, ...)."),
    mos_range: str | None = typer.Option(None, help="Native MOS range LO,HI (overrides)."),
    mode: str = typer.Option("reason", help="reason (full answer) or fast (no reasoning text)."),
    readout: str = typer.Option(
        "text", help="reason mode: text (the number written) or expected (its expected value "
                     "under the model's digit probabilities; the report also has the written)."),
    batch_size: int = typer.Option(8, help="Images per batch."),
    max_tokens: int = typer.Option(512, help="Token budget of a reasoning answer."),
    temperature: float = typer.Option(0.0, help="Sampling temperature of a reasoning answer; 0 "
                                      "is greedy."),
    seed: int | None = typer.Option(None, help="Seed for sampling (--temperature above 0), so "
                                    "a sampled evaluation can be repeated.",
                                    show_default="random"),
    min_pixels: int | None = typer.Option(
        None, help="Smallest image area fed to the model.",
        show_default="the bundle's, else 100352"),
    max_pixels: int | None = typer.Option(
        None, help="Largest image area fed to the model.",
        show_default="the bundle's, else 401408"),
    verify: bool = typer.Option(True, help="Verify a --bundle's checksums before loading."),
    limit: int | None = typer.Option(None, help="Only the first N samples."),
    out: Path | None = typer.Option(None, help="Write the JSON report here."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --out file even if "
                               "it is not a qponder eval report (never an input file)."),
) -> None:
    """Score a labelled set; print SRCC/PLCC/n/format-rate; write a JSON report.

    Example: qponder eval --data labels.jsonl --adapter runs/grpo/adapters --out report.json
    """
    from qponder_mlx.cli.common import check_at_least, check_outputs, writing

    from qponder_mlx.evaluate import evaluate
    from qponder_mlx.io import atomic_write_json
    from qponder_mlx.safe_paths import shown

    check_scoring_flags(mode, readout)
    check_at_least(batch_size=(batch_size, 1), max_tokens=(max_tokens, 1),
                   min_pixels=(min_pixels, 1), max_pixels=(max_pixels, 1), limit=(limit, 1))
    samples, problems = read_samples(data, format=format, images_root=images_root,
                                     mos_range=mos_range, limit=limit)
    # Before the model loads. The images are inputs too (`--out photo.jpg` from a glob).
    check_outputs({"--out": (out, "eval_json")}, inputs=[data, *(s.image for s in samples)],
                  force=force)
    scorer = load_scorer(model, adapter, bundle, verify=verify, mode=mode, readout=readout,
                         batch_size=batch_size, max_tokens=max_tokens, min_pixels=min_pixels,
                         max_pixels=max_pixels, temperature=temperature, seed=seed)
    report = evaluate(scorer, samples, problems)
    typer.echo(report.headline())
    if out:
        with writing("--out", out, safe="the scores above were printed but not saved",
                     resume="fix that and rerun with --out on a writable disk"):
            atomic_write_json(out, report.to_dict())
        typer.echo(f"report: {shown(out)}")
    if report.n_images_failed == len(samples):
        fail(f"{data}: none of the {len(samples)} images could be scored (unreadable)", code=1)


def _register_commands() -> None:
    """Each `cli/cmd_<name>.py` adds its commands through `register(app)`: one file per command
    group keeps this file small and lets commands grow without touching each other."""
    import importlib
    import pkgutil

    import qponder_mlx.cli as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}").register(app)


_register_commands()


# The rank variables of the launchers `init_world` (qponder_mlx/train/distributed.py) accepts.
RANK_VARIABLES = ("MLX_RANK", "JACCL_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def quiet_unless_rank_zero(environ=os.environ) -> bool:
    """Under `mlx.launch` every rank runs this same command: only rank 0 prints its progress,
    messages and summary (N copies of every line would bury them). The other ranks keep stderr
    for `error:` lines and tracebacks. Returns True when this process was silenced."""
    import sys

    rank = next((environ[k] for k in RANK_VARIABLES if environ.get(k)), "0")
    if rank.strip() in ("", "0"):
        return False
    from qponder_mlx.progress import console

    console.quiet = True  # `say()` and rich bars
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 — for the life of the process
    return True


def main() -> None:  # pragma: no cover - console entry point wrapper
    import warnings

    quiet_unless_rank_zero()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Pillow warns in two lines about a corrupt EXIF block of an image we then score fine.
    warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

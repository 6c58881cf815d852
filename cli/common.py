"""Pieces every command shares: one-line failures, model loading, option parsing."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: <message>` (one line per problem) and exit; no traceback for user errors."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def parse_range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        fail(f"--mos-range {text!r}: expected LO,HI such as 0,100")
    if not lo < hi:
        fail(f"--mos-range {text!r}: LO must be below HI")
    return lo, hi


def load_scorer(model: str, adapter: Path | None, bundle: Path | None, **config):
    """Scorer for --model/--adapter or --bundle; load errors become one-line failures."""
    from qponder_mlx.generate import SamplingConfig
    from qponder_mlx.images import PixelPolicy
    from qponder_mlx.model import ModelLoadError
    from qponder_mlx.scoring import Scorer

    config["sampling"] = SamplingConfig(max_tokens=config.pop("max_tokens", 512))
    try:
        config["pixels"] = PixelPolicy(min_pixels=config.pop("min_pixels", 128 * 28 * 28),
                                       max_pixels=config.pop("max_pixels", 512 * 28 * 28))
    except ValueError as e:
        fail(f"--min-pixels/--max-pixels: {e}")
    try:
        return Scorer.load(model, adapter, bundle=bundle, **config)
    except (ModelLoadError, ValueError, FileNotFoundError) as e:
        fail(str(e))

"""Pieces every command shares: one-line failures, model loading, option parsing."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer

from qponder_mlx.safe_paths import OutputPathError, check_distinct, check_output, shown


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: <message>` (one line per problem) and exit; no traceback for user errors.

    Control characters are escaped (a file name in the message cannot drive the terminal);
    only the line breaks between problems stay.
    """
    text = "\n".join(shown(line) for line in str(message).split("\n"))
    typer.secho(f"error: {text}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def skipped(problem: object) -> None:
    """One `skipped: ...` line on stderr, control characters escaped."""
    typer.echo(f"skipped: {shown(problem)}", err=True)


def check_at_least(**options: tuple[float | None, float]) -> None:
    """`--batch-size -5`: fail before anything loads. options: flag_name=(value, minimum);
    a None value (option not given) passes."""
    for name, (value, minimum) in options.items():
        if value is not None and not value >= minimum:
            flag = "--" + name.replace("_", "-")
            fail(f"{flag} {value}: must be at least {minimum:g}")


def check_outputs(outputs: dict[str, tuple[Path | None, str]], *, store: Path | None = None,
                  inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> None:
    """Refuse (one line) output paths that are the store, an input, a folder or someone else's
    file; outputs: option -> (path or None, kind in safe_paths.OUTPUT_KINDS)."""
    inputs = list(inputs)
    try:
        check_distinct({opt: path for opt, (path, _) in outputs.items()})
        for option, (path, kind) in outputs.items():
            if path is not None:
                check_output(option, path, kind, store=store, inputs=inputs, force=force)
    except OutputPathError as e:
        fail(str(e))


@contextmanager
def writing(option: str, path: Path, *, safe: str, resume: str) -> Iterator[None]:
    """A failed write of `path` (disk full, read-only folder) becomes one line saying what
    failed, what is safe (`safe`) and how to carry on (`resume`), instead of a traceback."""
    from qponder_mlx.safe_paths import os_error_reason

    try:
        yield
    except OSError as e:
        fail(f"{option} {shown(path)}: cannot write ({os_error_reason(e)}) — {safe}; {resume}")


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


def read_samples(data: Path, *, format: str = "auto", images_root: Path | None = None,
                 mos_range: str | None = None, limit: int | None = None):
    """Label rows for a command: bad rows are listed (first 20) and skipped, none left fails."""
    from qponder_mlx.labels import LabelError, read_labels

    try:
        samples, problems = read_labels(data, format=format, images_root=images_root,
                                        mos_range=parse_range(mos_range), limit=limit)
    except LabelError as e:
        fail(str(e))
    for p in problems[:20]:
        skipped(p)
    if len(problems) > 20:
        typer.echo(f"... and {len(problems) - 20} more skipped label rows", err=True)
    if limit:
        samples = samples[:limit]
    if not samples:
        fail(f"{data}: no usable samples ({len(problems)} rows had problems)")
    return samples, problems


def check_scoring_flags(mode: str, readout: str) -> None:
    """--mode/--readout checked before any model loads (a bad flag should not cost a load)."""
    from qponder_mlx.scoring import MODES, READOUTS

    if mode not in MODES:
        fail(f"--mode {mode!r}: expected reason or fast")
    if readout not in READOUTS:
        fail(f"--readout {readout!r}: expected text or expected")
    if mode == "fast" and readout != "text":
        fail("--readout expected is for --mode reason; fast mode already reads the expected "
             "leading digit")


def pixel_policy(min_pixels: int | None, max_pixels: int | None, bundle: Path | None):
    """--min/--max-pixels, else the bundle's own policy (its manifest), else the defaults."""
    from qponder_mlx.images import PixelPolicy

    if bundle is not None and (min_pixels is None or max_pixels is None):
        from qponder_mlx.export.bundle import bundle_info

        from qponder_mlx.model import ModelLoadError

        try:
            saved = bundle_info(bundle).get("pixels", {})
        except ModelLoadError as e:
            fail(str(e))
        min_pixels = saved.get("min_pixels") if min_pixels is None else min_pixels
        max_pixels = saved.get("max_pixels") if max_pixels is None else max_pixels
    default = PixelPolicy()
    try:
        return PixelPolicy(min_pixels=min_pixels or default.min_pixels,
                           max_pixels=max_pixels or default.max_pixels)
    except ValueError as e:
        fail(f"--min-pixels/--max-pixels: {e}")


def load_scorer(model: str, adapter: Path | None, bundle: Path | None, *,
                verify: bool = True, min_pixels: int | None = None,
                max_pixels: int | None = None, max_tokens: int = 512, temperature: float = 0.0,
                seed: int | None = None, **config):
    """Scorer for --model/--adapter or --bundle; load errors become one-line failures.

    `seed` seeds MLX's generator, which mlx-lm's sampler draws from (temperature above 0)."""
    from qponder_mlx.generate import SamplingConfig
    from qponder_mlx.model import ModelLoadError
    from qponder_mlx.scoring import Scorer

    if bundle is not None and adapter is not None:
        fail("--adapter and --bundle: a bundle already holds its fused adapter — pass one")
    if not temperature >= 0:
        fail(f"--temperature {temperature}: must be at least 0 (0 is greedy)")
    config["sampling"] = SamplingConfig(max_tokens=max_tokens, temperature=temperature)
    if seed is not None:
        import mlx.core as mx

        mx.random.seed(seed)
    if "pixels" not in config:  # a caller may pass a ready PixelPolicy
        config["pixels"] = pixel_policy(min_pixels, max_pixels, bundle)
    try:
        if bundle is None:
            return Scorer.load(model, adapter, **config)
        from qponder_mlx.export.bundle import load_bundle

        from qponder_mlx.scoring import ScoreConfig

        return Scorer(load_bundle(bundle, verify=verify), ScoreConfig(**config))
    except (ModelLoadError, ValueError, FileNotFoundError) as e:
        fail(str(e))

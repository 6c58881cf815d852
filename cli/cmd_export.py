"""`qponder export` (a fused, quantized, verified bundle) and `qponder bundle verify|info`.

Export options live in ExportConfig; precedence: defaults < --config FILE (TOML) < flags.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import typer
from qponder_mlx.cli.common import fail

from qponder_mlx.model import DEFAULT_MODEL

EXIT_INTERRUPTED = 130

bundle_app = typer.Typer(no_args_is_help=True,
                         help="Inspect and check bundles made by `qponder export`.")


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
    app.add_typer(bundle_app, name="bundle")


def export_cmd(
    model: str | None = typer.Option(None, help="Base model: repo id or folder, float or "
                                     "already quantized.", show_default=DEFAULT_MODEL),
    adapter: Path | None = typer.Option(None, "--adapter", "--adapter-path",
                                        help="LoRA adapter folder to fuse in."),
    out: Path | None = typer.Option(None, help="Bundle folder to create.",
                                    show_default="bundle"),
    bits: int | None = typer.Option(None, help="Bits per weight: 2,3,4,5,6,8.", show_default="4"),
    group_size: int | None = typer.Option(None, help="Quantization group.",
                                          show_default="64 affine, 32 mxfp4"),
    q_mode: str | None = typer.Option(None, help="affine or mxfp4.", show_default="affine"),
    quantize: bool | None = typer.Option(None, "--quantize/--no-quantize",
                                         help="--no-quantize: fuse only, keep float weights.",
                                         show_default="quantize"),
    quantize_vision: bool | None = typer.Option(None, "--quantize-vision",
                                                help="Quantize the vision tower too."),
    calibration: Path | None = typer.Option(None, help="Label file for the agreement report.",
                                            show_default="the CC0 set qponder ships"),
    calibration_limit: int | None = typer.Option(None, help="Only the first N calibration "
                                                 "images."),
    reason_images: int | None = typer.Option(None, help="Images that also get a reasoning "
                                             "answer, for the format rate.",
                                             show_default="4"),
    reason_max_tokens: int | None = typer.Option(None, help="Token budget of those answers.",
                                                 show_default="128"),
    agreement: bool | None = typer.Option(None, "--agreement/--no-agreement",
                                          help="Measure bundle vs unfused model.",
                                          show_default="agreement"),
    min_pixels: int | None = typer.Option(None, help="Pixel policy recorded for the app and "
                                          "used for the agreement runs.",
                                          show_default="100352 = 128*28*28"),
    max_pixels: int | None = typer.Option(None, help="Largest pixel count.",
                                          show_default="401408 = 512*28*28"),
    batch_size: int | None = typer.Option(None, help="Images per model call.",
                                          show_default="8"),
    force: bool | None = typer.Option(None, "--force", help="Replace a non-empty --out."),
    target: str | None = typer.Option(None, help="Who loads the bundle: mlx-swift (refuse a "
                                      "bundle MLX Swift's loader would not load) or python "
                                      "(mlx-vlm only, no check).", show_default="mlx-swift"),
    config: Path | None = typer.Option(None, help="TOML file with any ExportConfig field."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Fuse an adapter into its base, quantize with MLX and write a verified bundle.

    Stock mlx-vlm (and MLX Swift VLM loaders) read the bundle; its qponder.json manifest is for
    the app.

    Example: qponder export --adapter runs/grpo/adapters --out bundle
    """
    from qponder_mlx.export.config import ExportConfig, ExportConfigError
    from qponder_mlx.export.staging import OutputExistsError, check_destination
    from qponder_mlx.export.swift_compat import SwiftCompatError

    from qponder_mlx.model import ModelLoadError
    from qponder_mlx.train.config import ConfigError, load_config
    from qponder_mlx.train.lora import AdapterError

    flags = {
        "model": model, "adapter": adapter, "out": out, "bits": bits, "group_size": group_size,
        "q_mode": q_mode, "quantize": quantize, "quantize_vision": quantize_vision,
        "calibration": calibration, "calibration_limit": calibration_limit,
        "reason_images": reason_images, "reason_max_tokens": reason_max_tokens,
        "agreement": agreement, "min_pixels": min_pixels, "max_pixels": max_pixels,
        "batch_size": batch_size, "force": force, "target": target,
    }
    overrides = {k: str(v) if isinstance(v, Path) else v for k, v in flags.items()
                 if v is not None}
    try:
        cfg = load_config(ExportConfig, config, overrides)
        cfg.validate()
    except (ConfigError, ExportConfigError) as e:
        fail(str(e))

    try:
        # Before importing the model stack: a wrong --out should fail in a second, not after
        # the base model has loaded.
        check_destination(Path(cfg.out).expanduser(), cfg.force)
        from qponder_mlx.export.bundle import export_bundle, summary_lines

        result = export_bundle(cfg, progress=progress,
                               log=lambda msg: typer.echo(msg, err=True))
    except (ExportConfigError, OutputExistsError, ModelLoadError, AdapterError,
            SwiftCompatError, FileNotFoundError) as e:
        fail(str(e))
    except OSError as e:  # disk full, read-only folder: the staged folder is already removed
        from qponder_mlx.safe_paths import os_error_reason, shown

        fail(f"--out {shown(cfg.out)}: cannot write ({os_error_reason(e)}) — nothing was "
             "written there (the partial bundle was removed); free space or pick a writable "
             "--out, then rerun the same command")
    except KeyboardInterrupt:
        typer.secho(f"interrupted — nothing was written to {cfg.out}", err=True,
                    fg=typer.colors.YELLOW)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    for line in summary_lines(result.manifest):
        typer.echo(line)
    _warn_no_format(result.manifest)
    typer.echo(f"bundle: {result.out} ({result.seconds:.1f} s); check it any time with "
               f"`qponder bundle verify {result.out}`")


def _warn_no_format(manifest: dict) -> None:
    """A bundle whose reasoning answers never parse scores nothing in reason mode: say so
    loudly instead of leaving `format rate 0.0` in the middle of the summary."""
    rate = ((manifest.get("agreement") or {}).get("reason") or {}).get("format_rate") or {}
    if rate.get("bundle") != 0:  # None: not measured
        return
    ref = rate.get("reference")
    why = ("the model it was made from fails too (reference 0.0): an adapter not trained to "
           "answer in format, or answers longer than --reason-max-tokens" if ref == 0 else
           f"the model it was made from answers in format ({ref}): quantization broke it — "
           "try --bits 8 or --no-quantize")
    typer.secho("warning: format rate 0.0 — none of the bundle's reasoning answers has the "
                f"<think>…</think><answer>X.XX</answer> form, so `--mode reason` will score "
                f"nothing; {why}. `--mode fast` still scores.", err=True,
                fg=typer.colors.YELLOW, bold=True)


@bundle_app.command("verify")
def verify_cmd(
    path: Path = typer.Argument(..., help="Bundle folder."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress."),
    golden: bool = typer.Option(True, "--golden/--no-golden", help="Also load the model and "
                                "recompute the golden vectors."),
) -> None:
    """Recompute every checksum and check every weight header; then load the model and recompute
    its golden vectors. Exit 1 and name each bad, missing or unexpected file or value.

    Example: qponder bundle verify bundle
    """
    from qponder_mlx.export.golden import verify_folder
    from qponder_mlx.export.manifest import MANIFEST
    from qponder_mlx.export.verify import verify_bundle

    from qponder_mlx.progress import progress_bar

    total = None
    # Only for the progress bar's length; verify_bundle reports what is wrong with the manifest.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        total = len(json.loads((path / MANIFEST).read_text()).get("files", {}))
    with progress_bar(total, "verify", unit="file", enabled=progress) as advance:
        result = verify_bundle(path, on_file=lambda name, size: advance())
    golden_line = ""
    if result.ok and golden and result.manifest is not None:
        if result.manifest.get("golden"):
            result.problems += verify_folder(path, result.manifest)
            golden_line = "; golden vectors recomputed and matched"
        else:
            golden_line = "; no golden vectors (bundle made before they existed)"
    if not result.ok:
        for p in result.problems:
            typer.secho(f"error: {p}", err=True, fg=typer.colors.RED)
        typer.echo(f"FAILED: {len(result.problems)} problem(s) in {path}", err=True)
        raise typer.Exit(1)
    typer.echo(f"OK: {result.files_checked} files, {result.bytes_checked / 1e6:.1f} MB match "
               f"{path / MANIFEST}{golden_line}")


@bundle_app.command("info")
def info_cmd(
    path: Path = typer.Argument(..., help="Bundle folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
) -> None:
    """Show what a bundle holds (base, adapter, quantization, agreement); weights not hashed.

    Example: qponder bundle info bundle --json
    """
    from qponder_mlx.export.bundle import bundle_info, summary_lines
    from qponder_mlx.export.verify import BundleError

    try:
        manifest = bundle_info(path)
    except BundleError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(manifest, indent=2, ensure_ascii=False))
        return
    for line in summary_lines(manifest):
        typer.echo(line)
    typer.echo("manifest checksum OK; run `qponder bundle verify` to check the weights")


@bundle_app.command("resize-parity")
def resize_parity_cmd(
    model: str = typer.Option(..., help="Model or bundle folder (or repo id) to score with."),
    adapter: Path | None = typer.Option(None, "--adapter", "--adapter-path",
                                        help="LoRA adapter folder."),
    calibration: Path | None = typer.Option(None, help="Label file.",
                                            show_default="the 36 CC0 images qponder ships"),
    calibration_limit: int | None = typer.Option(None, help="Only the first N images."),
    min_pixels: int = typer.Option(128 * 28 * 28, help="Pixel policy's smallest pixel count."),
    max_pixels: int = typer.Option(512 * 28 * 28, help="Pixel policy's largest pixel count."),
    batch_size: int = typer.Option(8, help="Images per model call."),
    out: Path | None = typer.Option(None, help="Also write the report as JSON here."),
) -> None:
    """Score the calibration set with the photo resized four ways (qponder's Pillow bicubic,
    bicubic in linear light, Lanczos, bilinear); print |Δscore| and SRCC against qponder's.

    Example: qponder bundle resize-parity --model bundle --out parity.json
    """
    from qponder_mlx.export.agreement import load_calibration
    from qponder_mlx.export.config import ExportConfigError
    from qponder_mlx.export.resize_parity import measure, table_lines

    from qponder_mlx.images import PixelPolicy
    from qponder_mlx.io import atomic_write_json
    from qponder_mlx.model import ModelLoadError, load_model

    try:
        pixels = PixelPolicy(min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as e:
        fail(f"--min-pixels/--max-pixels: {e}")
    try:
        calib = load_calibration(calibration, calibration_limit)
        loaded = load_model(model, adapter)
    except (ExportConfigError, ModelLoadError) as e:
        fail(str(e))
    report = measure(loaded, calib.images, pixels, calib.mos, batch_size)
    report["calibration"] = calib.file.name
    report["model"] = {"model": Path(model).name, "adapter": adapter.name if adapter else None}
    for line in table_lines(report):
        typer.echo(line)
    if out is not None:
        atomic_write_json(out, report)

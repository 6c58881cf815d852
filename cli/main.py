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
from qponder_mlx.synth import CC0_PHOTOS

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train, run and ship reasoning image-quality models with MLX.")
dev = typer.Typer(no_args_is_help=True, help="Developer tools: offline tiny models and data.")
app.add_typer(dev, name="dev")


@dev.command("tiny-model")
def tiny_model(
    path: Path = typer.Argument(..., help="Folder to write the model into."),
    seed: int = typer.Option(0, help="RNG seed: same seed, same weights."),
    hidden_size: int = typer.Option(64, help="Language-model width (multiple of 16)."),
    num_layers: int = typer.Option(2, help="Language-model layers."),
    vocab_size: int = typer.Option(640, help="BPE vocabulary target."),
    vision_hidden: int = typer.Option(64, help="Vision-tower width (multiple of 16)."),
    vision_depth: int = typer.Option(2, help="Vision-tower blocks."),
    vision_stem: str = typer.Option("random", help="random, or dct: the fixed DCT-energy stem "
                                    "(needs --vision-hidden 320 --vision-depth 3)."),
) -> None:
    """Write a tiny random Qwen2.5-VL that every command accepts, so you can try qponder offline."""
    from qponder_mlx.testing import build_tiny_model

    try:
        out = build_tiny_model(path, seed=seed, hidden_size=hidden_size, num_layers=num_layers,
                               vocab_size=vocab_size, vision_hidden=vision_hidden,
                               vision_depth=vision_depth, vision_stem=vision_stem)
    except ValueError as e:
        fail(f"qponder dev tiny-model: {e}")
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    typer.echo(f"tiny Qwen2.5-VL written to {out} ({size:.1f} MB)")


@dev.command("whiten-stem")
def whiten_stem(
    model: Path = typer.Argument(..., help="A tiny model folder (qponder dev tiny-model)."),
    data: Path = typer.Option(..., help="Label file whose images to whiten over (the TRAIN "
                              "split: MOS values are not read)."),
    rel: float = typer.Option(0.01, min=0.0, max=1.0, help="Keep the directions whose spread "
                              "is above this fraction of the strongest one."),
) -> None:
    """Whiten the image tokens a tiny model hands its language model over a set of images
    (qponder_mlx.stem_whitening): same mean and total spread, every direction equally strong."""
    from qponder_mlx.data import LabelError
    from qponder_mlx.stem_whitening import WhiteningError, images_of, whiten_merger

    try:
        record = whiten_merger(model, images_of(data), rel)
    except (LabelError, WhiteningError) as e:
        fail(f"qponder dev whiten-stem: {e}")
    typer.echo(f"{model}: image tokens whitened over {record['images']} images "
               f"({record['directions']} of {record['hidden']} directions kept)")


@dev.command("synth-iqa")
def synth_iqa(
    out: Path = typer.Argument(..., help="Folder for the images and label files."),
    size: int = typer.Option(224, help="Centre-crop side in pixels."),
    photos: str = typer.Option(",".join(sorted(CC0_PHOTOS)),
                               help="Comma-separated scikit-image CC0 photos to use."),
    test_photos: str = typer.Option("coffee,rocket,grass",
                                    help="Photos held out for test.jsonl (no photo in both)."),
    seed: int = typer.Option(0, help="Noise and crop seed."),
    crops: int = typer.Option(0, min=0, help="Also N random crops (random scale, place and "
                              "flip) of every TRAIN photo; test photos keep the centre crop."),
    test_crops: int = typer.Option(0, min=0, help="Also N random crops of every TEST photo, in "
                                   "test_crops.jsonl (test.jsonl keeps the centre crops only)."),
) -> None:
    """A KADID-style set: CC0 photos × blur/noise/JPEG × 5 KADID levels, labelled with KADID's
    mean MOS per (type, level). Writes labels.jsonl, train.jsonl and test.jsonl."""
    from qponder_mlx.synth import (
        center_crop,
        crop_view,
        load_cc0_photo,
        random_crops,
        view_seed,
        write_set,
    )

    names = [n.strip() for n in photos.split(",") if n.strip()]
    held = {n.strip() for n in test_photos.split(",") if n.strip()}
    unknown = sorted(set(names) - set(CC0_PHOTOS)) + sorted(held - set(names))
    if unknown:
        fail(f"--photos/--test-photos: unknown or unused photo(s) {unknown}; "
             f"choose from {sorted(CC0_PHOTOS)}")
    try:
        photos_ = {n: load_cc0_photo(n) for n in names}
    except RuntimeError as e:
        fail(str(e))
    refs = {n: center_crop(im, size) for n, im in photos_.items()}
    photo_of = {n: n for n in names}
    split = {n: "test" if n in held else "train" for n in names}
    for n in names:
        count = test_crops if n in held else crops
        for c, im in enumerate(random_crops(photos_[n], size, count, seed=view_seed(seed, n))):
            view = crop_view(n, c)
            refs[view], photo_of[view] = im, n
            if n in held:
                split[view] = "test_crops"
    items = write_set(out, refs, split=split, seed=seed, photo_of=photo_of)
    n_train = sum(split[i.reference] == "train" for i in items)
    typer.echo(f"{len(items)} images in {out} ({n_train} train, {len(items) - n_train} test"
               + (" incl. test_crops.jsonl)" if test_crops else ")"))


@app.command("eval")
def eval_cmd(
    data: Path = typer.Option(..., help="Label file (any format `load_labels` reads)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Repo id or folder."),
    adapter: Path | None = typer.Option(None, help="LoRA adapter folder (mlx-vlm format)."),
    bundle: Path | None = typer.Option(None, help="A verified qponder bundle instead of --model."),
    images_root: Path | None = typer.Option(None, help="Folder the label paths are relative to."),
    format: str = typer.Option("auto", help="Label format (auto, koniq, kadid, livec, ...)."),
    mos_range: str | None = typer.Option(None, help="Native MOS range LO,HI (overrides)."),
    mode: str = typer.Option("reason", help="reason (full answer) or fast (one forward pass)."),
    readout: str = typer.Option(
        "text", help="reason mode: text (the number written) or expected (its expected value "
                     "under the model's digit probabilities; the report also has the written)."),
    batch_size: int = typer.Option(8, help="Images per batch."),
    max_tokens: int = typer.Option(512, help="Token budget of a reasoning answer."),
    min_pixels: int | None = typer.Option(
        None, help="Smallest image area fed to the model [default: the bundle's, else 100352]."),
    max_pixels: int | None = typer.Option(
        None, help="Largest image area fed to the model [default: the bundle's, else 401408]."),
    verify: bool = typer.Option(True, help="Verify a --bundle's checksums before loading."),
    limit: int | None = typer.Option(None, help="Only the first N samples."),
    out: Path | None = typer.Option(None, help="Write the JSON report here."),
) -> None:
    """Score a labelled set; print SRCC/PLCC/n/format-rate; write a JSON report."""
    from qponder_mlx.evaluate import evaluate
    from qponder_mlx.io import atomic_write_json

    check_scoring_flags(mode, readout)
    samples, problems = read_samples(data, format=format, images_root=images_root,
                                     mos_range=mos_range, limit=limit)
    scorer = load_scorer(model, adapter, bundle, verify=verify, mode=mode, readout=readout,
                         batch_size=batch_size, max_tokens=max_tokens, min_pixels=min_pixels,
                         max_pixels=max_pixels)
    report = evaluate(scorer, samples, problems)
    typer.echo(report.headline())
    if out:
        atomic_write_json(out, report.to_dict())
        typer.echo(f"report: {out}")
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


def main() -> None:  # pragma: no cover - console entry point wrapper
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Pillow warns in two lines about a corrupt EXIF block of an image we then score fine.
    warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

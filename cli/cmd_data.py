"""`qponder data list` / `qponder data get NAME`: the public IQA sets, ready for eval and distill
(see docs/data.md)."""

from __future__ import annotations

from pathlib import Path

import typer
from qponder_mlx.cli.common import fail


def register(app: typer.Typer) -> None:
    data = typer.Typer(no_args_is_help=True,
                       help="Public IQA data sets: list them, download one ready for eval.")
    data.command("list")(list_sets)
    data.command("get")(get)
    data.command("sample")(sample)
    app.add_typer(data, name="data")


def list_sets() -> None:
    """Each set: images, download size, resolutions, where it comes from and its terms.

    Example: qponder data list
    """
    from qponder_mlx.iqa_sets.catalog import SETS, human_bytes

    for s in SETS:
        res = ", ".join(r.name for r in s.resolutions)
        typer.echo(f"{s.name:<9} {s.title} — {s.images:,} images, {human_bytes(s.download_bytes)}"
                   f" download, resolution {res}")
        typer.echo(f"          source: {s.source}")
        typer.echo(f"          terms:  {s.terms}; cite {s.cite}")
        if s.note:
            typer.echo(f"          note:   {s.note}")


def get(
    name: str = typer.Argument(..., help="A set from `qponder data list` (e.g. koniq10k)."),
    out: Path = typer.Option(Path("datasets"), help="Data root (pyiqa's layout: meta_info/ "
                             "beside one folder per set)."),
    keep_archive: bool = typer.Option(False, help="Keep the downloaded archive after "
                                      "unpacking (never deleted when it came from the HF "
                                      "cache)."),
) -> None:
    """Download NAME from the Hugging Face Hub (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE apply),
    unpack it safely, check its labels, and print the commands to evaluate and distill on it.

    Rerunning resumes an interrupted download; after a finished run it does nothing.

    Example: qponder data get koniq10k --out datasets
    """
    from qponder_mlx.iqa_sets import DataError, UnsafeArchive, find_set, get_set
    from qponder_mlx.progress import say

    s = find_set(name)
    if s is None:
        from qponder_mlx.iqa_sets.catalog import names

        fail(f"unknown data set {name!r} — one of: {', '.join(names())} (`qponder data list`)")
    say(f"{s.title}: {s.terms}; cite {s.cite}")
    try:
        p = get_set(s.name, out, say=say)
    except (DataError, UnsafeArchive) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(f"interrupted — rerun `qponder data get {s.name} --out {out}` to resume", code=130)
    if p.already:
        typer.echo(f"{s.name}: already in {p.out} (finished {p.finished}) — nothing to do")
    else:
        train = f", {p.n_train:,} to train on" if p.n_train is not None else ""
        typer.echo(f"{s.name}: {p.n_eval:,} labelled images to evaluate on{train}; "
                   f"images in {p.images_root}")
        for line in p.problems[:5]:
            typer.echo(f"skipped: {line}", err=True)
    for root in p.other_roots:
        typer.echo(f"other resolution: --images-root {root}")
    typer.echo("next:")
    for line in p.commands(s):
        typer.echo(f"  {line}")


def sample(out: Path = typer.Argument(..., help="Folder to write the sample set into.")) -> None:
    """The packaged 36-image CC0 set (labels.jsonl, a canned sft.jsonl, images/), offline: try
    eval, train and score on the tiny model without a download.

    Example: qponder data sample sample
    """
    from qponder_mlx.iqa_sets.sample import write_sample

    try:
        paths = write_sample(out)
    except OSError as e:
        fail(f"{out}: cannot write the sample set ({e.strerror or e}) — choose a writable folder")
    typer.echo(f"36 CC0 images in {paths['images']}; labels {paths['labels']}; "
               f"cold-start rows {paths['sft']}")
    typer.echo("next (no download):")
    typer.echo("  qponder dev tiny-model tiny")
    typer.echo(f"  qponder eval --model tiny --data {paths['labels']} --out report.json")

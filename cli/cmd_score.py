"""`qponder score`: score a photo library offline into a resumable store; export CSV/JSONL/HTML."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import typer
from qponder_mlx.cli.common import (
    check_at_least,
    check_outputs,
    check_scoring_flags,
    fail,
    load_scorer,
    pixel_policy,
    skipped,
    writing,
)

from qponder_mlx.model import DEFAULT_MODEL
from qponder_mlx.safe_paths import shown

# PixelPolicy's defaults, repeated here so `--help` shows them without importing the model stack.
DEFAULT_MIN_PIXELS = 128 * 28 * 28
DEFAULT_MAX_PIXELS = 512 * 28 * 28
EXIT_INTERRUPTED = 130  # the shell convention for "stopped by Ctrl-C"


def score_cmd(
    paths: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    model: str | None = typer.Option(None, help="Repo id or folder.", show_default=DEFAULT_MODEL),
    adapter: Path | None = typer.Option(None, "--adapter", "--adapter-path",
                                        help="LoRA adapter folder (mlx-vlm format)."),
    bundle: Path | None = typer.Option(
        None, help="A verified qponder bundle instead of --model."),
    db: Path = typer.Option(Path("results.sqlite"), help="Results store (SQLite); reruns resume."),
    csv: Path | None = typer.Option(None, help="Export this run's rows as CSV."),
    jsonl: Path | None = typer.Option(None, help="Export this run's rows as JSONL."),
    report: Path | None = typer.Option(None, help="Write the HTML gallery report."),
    mode: str = typer.Option("reason", help="reason (full reasoning) or fast (no reasoning text)."),
    readout: str = typer.Option(
        "text", help="reason mode: text (the number written) or expected (its expected value "
                     "under the model's digit probabilities: fewer tied scores)."),
    batch_size: int = typer.Option(8, help="Images per model call."),
    max_tokens: int = typer.Option(512, help="Token budget of a reasoning answer (part of the "
                                   "store key: a new value scores again)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature of a reasoning answer; 0 "
                                      "is greedy (part of the store key)."),
    seed: int | None = typer.Option(None, help="Seed for sampling (--temperature above 0), so "
                                    "a sampled run can be repeated; not part of the store key.",
                                    show_default="random"),
    rescore: bool = typer.Option(False, "--rescore", help="Score these files again even if the "
                                 "store has their scores for these settings (replaces them)."),
    min_pixels: int | None = typer.Option(
        None, help="Smallest pixel count the model sees (part of the store key).",
        show_default=f"the bundle's, else {DEFAULT_MIN_PIXELS}"),
    max_pixels: int | None = typer.Option(
        None, help="Largest pixel count the model sees (part of the store key).",
        show_default=f"the bundle's, else {DEFAULT_MAX_PIXELS}"),
    recursive: bool = typer.Option(True, "--recursive/--no-recursive", help="Walk sub-folders."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --csv/--jsonl/"
                               "--report file even if it is not a qponder export (never the "
                               "store or an input image)."),
    explain: str | None = typer.Option(
        None, help="With --mode fast: then reason about the photos picked by fast score, e.g. "
                   "worst:50,best:20 (both results kept in --db and shown in --report)."),
) -> None:
    """Score every photo under PATHS; results go to --db and rerunning skips what is done.

    Example: qponder score ~/Pictures --mode fast --db photos.sqlite --report photos.html
    """
    from qponder_mlx.library import (
        IMAGE_SUFFIXES,
        ResultStore,
        StopFlag,
        StoreError,
        discover,
        score_library,
        stop_on_sigint,
        write_csv,
        write_jsonl,
        write_report,
    )

    if bundle is not None and (model is not None or adapter is not None):
        fail("--bundle already holds the model and adapter — pass --bundle or --model/--adapter")
    check_scoring_flags(mode, readout)
    spec = None
    if explain is not None:
        from qponder_mlx.library.fast_first import parse_explain

        if mode != "fast":
            fail("--explain picks photos by their fast scores — add --mode fast")
        try:
            spec = parse_explain(explain)
        except ValueError as e:
            fail(str(e))
    check_at_least(batch_size=(batch_size, 1), max_tokens=(max_tokens, 1),
                   min_pixels=(min_pixels, 1), max_pixels=(max_pixels, 1))
    # A bundle carries the pixel policy it was exported (and checked) with: use it unless told.
    pixels = pixel_policy(min_pixels, max_pixels, bundle)

    found = discover(paths, recursive=recursive)
    for p in found.problems[:20]:
        skipped(p)
    if len(found.problems) > 20:
        typer.echo(f"... and {len(found.problems) - 20} more paths skipped", err=True)
    if not found.files and not found.errors:
        fail(f"no image files found in {', '.join(map(shown, paths))} — looked for "
             f"{' '.join(sorted(IMAGE_SUFFIXES))}")
    typer.echo(f"{len(found.files)} images found" + (
        f", {len(found.errors)} that cannot be read (error rows: broken links, names not "
        "UTF-8)" if found.errors else "") + (
        f" ({found.skipped} other files ignored)" if found.skipped else ""), err=True)
    # Before the store opens and the model loads: a refused path must cost nothing.
    check_outputs({"--csv": (csv, "csv"), "--jsonl": (jsonl, "jsonl"),
                   "--report": (report, "report")}, store=db, inputs=found.files, force=force)

    def open_store():
        try:
            return ResultStore(db)
        except StoreError as e:
            fail(str(e))

    # An existing store is checked before the model loads (a foreign or damaged file costs
    # nothing); a new one is created only once the model is up, so a failed load leaves no
    # empty results.sqlite behind.
    store = open_store() if Path(db).exists() else None
    try:
        scorer = load_scorer(model or DEFAULT_MODEL, adapter, bundle, mode=mode, readout=readout,
                             batch_size=batch_size, max_tokens=max_tokens, pixels=pixels,
                             temperature=temperature, seed=seed)
    except KeyboardInterrupt:
        typer.echo("interrupted while loading the model; nothing was scored.", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    store = store or open_store()
    with store:
        try:
            earlier = _before_run(store, scorer, found, rescore)
        except StoreError as e:
            fail(str(e))
        stop = StopFlag()
        explained = None  # --explain: (reason scorer, picked paths, its summary)
        try:
            with stop_on_sigint(stop):
                summary = score_library(scorer, found.files, store, stop=stop, progress=progress)
                if spec is not None and not summary.interrupted:
                    from qponder_mlx.library.fast_first import explain_library

                    explained = explain_library(scorer, found.files, store, spec, stop=stop,
                                                progress=progress)
        except KeyboardInterrupt:
            typer.echo(f"aborted (second Ctrl-C): the batch in flight was not saved; every "
                       f"earlier batch is in {shown(db)}. Run the same command again to resume.",
                       err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except StoreError as e:  # disk full, read-only, locked by another process too long
            fail(str(e))
        summary.files += len(found.errors)
        summary.errors.update(earlier.path_errors)
        for line in summary.lines():
            typer.echo(line)

        report_rows = rows = store.rows(scorer.identity,
                                           [*map(str, found.files), *dict(found.errors)])
        for line in _after_run(rows, scorer.identity, earlier):
            typer.echo(line)
        if explained is not None:
            from qponder_mlx.library.fast_first import with_explanations

            reasoner, picked, why = explained
            typer.echo(f"explain: {len(picked)} photos picked by fast score, in reason mode:")
            for line in why.lines():
                typer.echo(f"  {line}")
            report_rows = with_explanations(rows, store.rows(reasoner.identity, picked))
        safe = f"nothing was lost: every score is in {shown(db)}"
        resume = "fix that and rerun the same command (scored files are skipped)"
        for option, path, write in (("--csv", csv, lambda p: write_csv(rows, p)),
                                    ("--jsonl", jsonl, lambda p: write_jsonl(rows, p)),
                                    ("--report", report, lambda p: write_report(
                                        store, report_rows, p, pending=summary.pending,
                                        progress=progress))):
            if path is None:
                continue
            try:
                with writing(option, path, safe=safe, resume=resume):
                    write(path)
            except StoreError as e:  # the report caches its thumbnails in the store
                fail(str(e))
            typer.echo(f"{option.lstrip('-')}: {shown(path)}")
    typer.echo(f"store: {shown(db)}")
    if explained is not None and explained[2].interrupted:
        typer.echo(f"interrupted: every photo has its fast score; {explained[2].pending} picked "
                   "photos not explained yet. Run the same command again to resume.", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    if summary.interrupted:
        typer.echo(f"interrupted: stopped after the current batch; {summary.pending} files not "
                   f"scored yet. Run the same command again to resume (scored files are "
                   f"skipped).", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    if summary.files and not (summary.scored + summary.cached + summary.no_score):
        fail(f"none of the {summary.files} files could be scored (reasons above)", code=1)


@dataclass
class _Before:
    results: int  # this scorer's results for these files before the run
    others: list[dict]  # other scorers with results for these files (ResultStore.identities)
    path_errors: Counter  # reason -> error rows stored for discovery's unreadable entries


def _before_run(store, scorer, found, rescore: bool) -> _Before:
    """--rescore drops this scorer's results for these files; broken links and names that are
    not UTF-8 become error rows; what the store held before is kept for the summary."""
    from qponder_mlx.library.path_errors import record_path_errors

    identity = scorer.identity
    files = [str(f) for f in found.files]
    mine = store.rows(identity, files)
    # None of these files under these settings: other settings (the few most recent) that did
    # score them let the summary say why everything is scored again.
    others = [] if mine else [{**i, "results": n} for i in store.identities()[:5]
                              if i["identity"] != identity
                              and (n := len(store.rows(i["identity"], files)))]
    before = _Before(len(mine), others, Counter())
    if rescore and mine:
        with store.transaction():
            store.drop_identity_results(identity, {r["sha256"] for r in mine})
        typer.echo(f"--rescore: {len(mine)} stored results of these files are scored again",
                   err=True)
    before.path_errors = record_path_errors(scorer, found.errors, store)
    return before


def _after_run(rows: list[dict], identity: str, before: _Before) -> list[str]:
    """Mean/median/min/max and the five lowest files; a note when these settings are new."""
    from qponder_mlx.library.score_stats import listing, settings_note, stats_line

    out = [line for line in (settings_note(identity, before.results, before.others),
                             stats_line(rows)) if line]
    return out + listing(rows, worst=5)


def register(app: typer.Typer) -> None:
    app.command("score")(score_cmd)

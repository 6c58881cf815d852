"""`qponder top`: the worst and best photos of a results store, without loading a model."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from qponder_mlx.cli.common import check_at_least, fail

from qponder_mlx.safe_paths import shown


def register(app: typer.Typer) -> None:
    app.command("top")(top)


def top(
    db: Path = typer.Option(Path("results.sqlite"), help="Results store written by `qponder "
                            "score`."),
    worst: int = typer.Option(10, help="List the N lowest-scored photos (0: none)."),
    best: int = typer.Option(10, help="List the N highest-scored photos (0: none)."),
    scorer: str | None = typer.Option(None, help="Which scorer's results, when the store holds "
                                      "several (model, mode, pixel or token settings): any part "
                                      "of its identity, e.g. fast or px3136-12544.",
                                      show_default="the most recent run's"),
) -> None:
    """List the lowest and highest scores in a store, with mean/median/min/max; reads only.

    Example: qponder top --db photos.sqlite --worst 20 --best 5
    """
    from qponder_mlx.library import ResultStore, StoreError
    from qponder_mlx.library.score_stats import listing, stats_line

    check_at_least(worst=(worst, 0), best=(best, 0))
    if not db.is_file():
        fail(f"--db {shown(db)}: no such results store — score some photos first: qponder score "
             f"PHOTOS --db {shown(db)}")
    try:
        with ResultStore(db) as store:
            ids = store.identities()
            picked = [i for i in ids if scorer is None or scorer in i["identity"]]
            if not picked:
                known = ", ".join(i["identity"] for i in ids) or "none"
                fail(f"--db {shown(db)}: no results" + (f" for --scorer {scorer!r} (scorers in "
                                                       f"this store: {known})" if scorer else ""))
            use = picked[0]
            rows = store.rows(use["identity"])
    except StoreError as e:
        fail(str(e))
    model = use["model"] + (f" + {use['adapter']}" if use["adapter"] else "")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(use["last_scored_at"]))
    typer.echo(f"{shown(db)}: {len(rows)} files, {use['mode']} mode, {shown(model)} "
               f"(last scored {when})")
    if len(ids) > 1:
        typer.echo(f"scorer {use['identity']}; {len(ids) - 1} other scorer settings in this "
                   "store — pick one with --scorer", err=True)
    line = stats_line(rows)
    typer.echo(line or "no scores yet (only errors or answers without a score)")
    for line in listing(rows, worst=worst, best=best):
        typer.echo(line)

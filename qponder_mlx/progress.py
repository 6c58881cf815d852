"""One rich progress bar style for every long job: count, rate, ETA."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


@contextmanager
def progress_bar(total: int | None, description: str, unit: str = "img", enabled: bool = True):
    """Yields `advance(n=1, **fields)`; shows `unit/s` and ETA. Silent when disabled or piped."""
    if not enabled or not sys.stderr.isatty() and not console.is_terminal:
        yield lambda n=1, **fields: None
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, console=console, transient=False) as prog:
        task = prog.add_task(description, total=total, rate="", info="")

        def advance(n: int = 1, **fields) -> None:
            prog.advance(task, n)
            speed = prog.tasks[task].speed
            info = " ".join(f"{k}={v}" for k, v in fields.items())
            prog.update(task, rate=f"{speed:.2f} {unit}/s" if speed else "", info=info)

        yield advance

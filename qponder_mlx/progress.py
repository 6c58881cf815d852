"""Progress for every long job: a rich bar on a terminal, plain status lines elsewhere.

On a terminal the bar shows count, rate, ETA and the job's own fields. When stdout is not a
terminal (nohup, CI, `qponder train ... > log`) a bar would print nothing until the end, so the
job prints one plain line on stdout instead — `sft 40/200 (20%) 1.9 step/s ETA 1m24s
loss=0.8123` — at the first item, then at least every `every` items or 30 seconds (a heartbeat
thread repeats the last line, marked `(working)`, while one item takes longer), and at the end.
Messages (`say`) are never re-wrapped to the terminal's width.
"""

from __future__ import annotations

import sys
import threading
import time
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
PLAIN_EVERY_S = 30.0


def say(message: str) -> None:
    """One status line on stderr: never re-wrapped, and brackets in paths are not markup."""
    console.print(message, soft_wrap=True, markup=False, highlight=False)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class PlainProgress:
    """The plain-line form of the bar: `advance(n, **fields)` prints when one is due, and
    `heartbeat()` (a background thread calls it) prints the last status again, marked
    `(working)`, when an item takes longer than `every_s` — a long step or batch still shows
    the job is alive."""

    def __init__(self, total: int | None, description: str, unit: str, every: int,
                 every_s: float = PLAIN_EVERY_S, out=None, completed: int = 0):
        self.total, self.description, self.unit = total, description, unit
        self.every, self.every_s = max(1, every), every_s
        self.out = out or sys.stdout
        self.done = self.start_done = self.last_done = completed
        self.printed = False
        self.fields: dict = {}
        self.lock = threading.Lock()
        self.t0 = self.last_t = time.monotonic()

    def line(self, fields: dict) -> str:
        elapsed = time.monotonic() - self.t0
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        parts = [self.description]
        if self.total:
            parts.append(f"{self.done}/{self.total} ({100 * self.done / self.total:.0f}%)")
        else:
            parts.append(f"{self.done}")
        if rate > 0:
            parts.append(f"{rate:.2f} {self.unit}/s" if rate >= 0.1
                         else f"{1 / rate:.1f} s/{self.unit}")
            if self.total and self.done < self.total:
                parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        parts += [f"{k}={v}" for k, v in fields.items()]
        return " ".join(parts)

    def advance(self, n: int = 1, **fields) -> None:
        with self.lock:
            self.done += n
            self.fields = fields
            now = time.monotonic()
            due = (not self.printed or self.done - self.last_done >= self.every
                   or now - self.last_t >= self.every_s
                   or (self.total is not None and self.done >= self.total))
            if due:
                print(self.line(fields), file=self.out, flush=True)
                self.last_done, self.last_t, self.printed = self.done, now, True

    def heartbeat(self) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.last_t >= self.every_s:
                print(self.line(self.fields) + " (working)", file=self.out, flush=True)
                self.last_t = now


@contextmanager
def progress_bar(total: int | None, description: str, unit: str = "img", enabled: bool = True,
                 every: int | None = None, completed: int = 0):
    """Yields `advance(n=1, **fields)`; `completed` items were done before (a resumed job).

    A rich bar when stdout and stderr are terminals; otherwise plain lines on stdout at least
    every `every` items (default: 10 for steps, else about 1 % of the total) or 30 s. Silent
    when disabled.
    """
    if not enabled:
        yield lambda n=1, **fields: None
        return
    if not (_is_terminal(sys.stdout) and (_is_terminal(sys.stderr) or console.is_terminal)):
        if every is None:
            every = 10 if unit == "step" else max(10, (total or 0) // 100)
        plain = PlainProgress(total, description, unit, every, completed=completed)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(plain.every_s / 3):
                plain.heartbeat()

        ticker = threading.Thread(target=beat, name="progress-heartbeat", daemon=True)
        ticker.start()
        try:
            yield plain.advance
        finally:
            stop.set()
            ticker.join()
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, console=console, transient=False) as prog:
        task = prog.add_task(description, total=total, completed=completed, rate="", info="")

        def advance(n: int = 1, **fields) -> None:
            prog.advance(task, n)
            speed = prog.tasks[task].speed
            info = " ".join(f"{k}={v}" for k, v in fields.items())
            prog.update(task, rate=f"{speed:.2f} {unit}/s" if speed else "", info=info)

        yield advance

"""Honest timing for the benches: the load average before and after, repeats with a median, and
a plain "busy" mark when the machine was not quiet.

    from timing import interleaved, median, result, run_main

    def main():
        times = interleaved({"ours": f, "baseline": g}, repeats=3)
        result("x_speedup", median(times["baseline"]) / median(times["ours"]), 2.0)

    run_main(main)  # the load before and after, quiet or BUSY, then the RESULT lines

A figure is for the record (docs/benchmarks.md) only from a quiet run: the 1-minute load average
at most `BUSY_PER_CORE` per core before, during and after. Neighbours on a shared box slow an
unbatched baseline more than a batched path (docs/benchmarks.md, scoring notes), so a busy run
can overstate a speedup as well as understate it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

BUSY_PER_CORE = 1.5
MIN_REPEATS = 3


def load1() -> float:
    """The 1-minute load average (0.0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def median(xs) -> float:
    return statistics.median(xs)


class Box:
    """The machine's load around a benchmark, and the RESULT lines printed with it."""

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self.loads: list[float] = []
        self._results: list[str] = []  # RESULT lines without their load tag

    def sample(self) -> float:
        x = load1()
        self.loads.append(x)
        return x

    @property
    def busy(self) -> bool:
        return max(self.loads, default=0.0) > BUSY_PER_CORE * self.cores

    def describe(self) -> str:
        lo, hi = self.loads[0], self.loads[-1]
        state = "BUSY" if self.busy else "quiet"
        return (f"load average {lo:.2f} before, {hi:.2f} after, max {max(self.loads):.2f} "
                f"on {self.cores} cores: {state}")

    def __enter__(self) -> Box:
        print(f"load average before: {self.sample():.2f} on {self.cores} cores", flush=True)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.sample()
        print(f"\n{self.describe()} ({time.perf_counter() - self._t0:.0f} s)")
        if self.busy:
            print(f"BUSY: load above {BUSY_PER_CORE} per core; rerun on a quiet machine before "
                  "recording these figures")
        tag = "busy" if self.busy else "quiet"
        for line in self._results:
            print(f"{line}  [{tag}]")

    def result(self, measure: str, value: float, goal, fmt: str = ".2f") -> None:
        """`RESULT <measure> <value> goal <goal>`, printed at the end with the load."""
        self._results.append(f"RESULT {measure} {value:{fmt}} goal {goal}")


_box: Box | None = None  # the Box of the bench `run_main` is running


def run_main(main: Callable[[], object]) -> None:
    """Run a bench's `main` inside a Box: the load before and after, and its `result` lines
    printed at the end, tagged quiet or busy."""
    global _box
    with Box() as _box:
        main()


def result(measure: str, value: float, goal, fmt: str = ".2f") -> None:
    """A RESULT line for the running bench (printed at once outside `run_main`)."""
    if _box is None:
        print(f"RESULT {measure} {value:{fmt}} goal {goal}")
    else:
        _box.result(measure, value, goal, fmt)


def sample() -> None:
    """Note the load now (between repeats), so a burst during the run marks it busy."""
    if _box is not None:
        _box.sample()


def note_repeats(repeats: int, what: str = "repeats") -> None:
    """Say so when a measure has fewer than MIN_REPEATS repeats: its median is no figure to
    record."""
    if repeats < MIN_REPEATS:
        print(f"note: {repeats} {what} (< {MIN_REPEATS}): a smoke run, not a figure to record")


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = MIN_REPEATS,
                box: Box | None = None) -> dict[str, list[float]]:
    """Seconds of each fn, `repeats` rounds of all of them in turn, so that a neighbour's burst
    hits every measure alike. A fn may return its own seconds (float) to leave set-up out."""
    note_repeats(repeats)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            dt = out if isinstance(out, float) else time.perf_counter() - t0
            times[name].append(dt)
        if (b := box or _box) is not None:
            b.sample()
    return times

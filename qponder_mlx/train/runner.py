"""The run loop SFT and GRPO share: everything around a stage's optimizer step.

`run_sft` and `run_grpo` each supply one function, `step(n) -> StepOutcome`; this module owns
the rest, so both stages behave the same way:

    run folder      created on first use; a fresh run refuses a folder that holds anything but
                    one of our runs (a model folder passed as --out by mistake stays intact),
                    and refuses one that already holds checkpoints (pass --resume)
    config.json     the resolved config, written at the start
    resume          from the newest checkpoint; the settings that define the run must match
    stop signals    SIGINT (Ctrl-C) and SIGTERM finish the step, save a checkpoint and raise
                    `RunStopped` (the CLI prints the resume command, exits 130 / 143); a second
                    SIGINT aborts at once
    bad steps       a non-finite loss or gradient skips the update; N in a row stop the run
    data problems   one record shape, {"file", "line", "kind", "message"}, in data_problems.jsonl
    metrics.jsonl   one row per report window (and per skipped step), curves.html at each save
    progress        a rich bar on a terminal; otherwise a plain status line on stdout at least
                    every 10 steps or 30 s (nohup, CI, `> log`)
    summary.json    the final numbers

Under `mlx.launch` only rank 0 writes files or prints.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.nn as nn

from qponder_mlx.io import append_jsonl, atomic_write_json
from qponder_mlx.progress import progress_bar, say
from qponder_mlx.train import checkpoint as ckpt_mod
from qponder_mlx.train.config import CONFIG_FILE, config_dict, save_config
from qponder_mlx.train.data_order import DataOrder
from qponder_mlx.train.distributed import World
from qponder_mlx.train.loop import peak_memory_gb
from qponder_mlx.train.runlog import CURVES_FILE, METRICS_FILE, MetricsLog, write_curves

ADAPTERS_DIR = "adapters"
PROBLEMS_FILE = "data_problems.jsonl"
SUMMARY_FILE = "summary.json"
# What a folder of ours may hold; anything else in a folder passed as --out means it is not a run.
RUN_FILES = {CONFIG_FILE, METRICS_FILE, CURVES_FILE, PROBLEMS_FILE, SUMMARY_FILE, ADAPTERS_DIR,
             ckpt_mod.CHECKPOINTS}
SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class RunStopped(Exception):
    """A stop signal ended the run after step `step`, whose checkpoint is saved."""

    def __init__(self, step: int, signum: int, run_dir: Path):
        super().__init__(f"stopped at step {step}; checkpoint saved")
        self.step, self.signum, self.run_dir = step, signum, run_dir

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def problem_row(file: str | Path, line: int | None, kind: str, message: str) -> dict:
    """The one shape of a data_problems.jsonl record."""
    return {"file": str(file), "line": line, "kind": kind, "message": " ".join(message.split())}


@dataclass
class StepOutcome:
    applied: bool  # False: a non-finite loss or gradient; nothing was written into the adapters
    loss: float
    metrics: dict[str, Any] = field(default_factory=dict)  # this step's numbers
    status: dict[str, str] = field(default_factory=dict)  # short fields for the progress line


@dataclass
class LoopSettings:
    iters: int
    steps_per_report: int
    steps_per_save: int
    max_bad_steps: int
    progress: bool


# ---------------------------------------------------------------- the run folder


def refuse_foreign_folder(run_dir: Path) -> None:
    """A fresh run writes config.json, adapters/ ... into --out: refuse a folder that holds
    anything else (a model folder given as --out would lose its config.json)."""
    if not run_dir.is_dir():
        return
    foreign = sorted(p.name for p in run_dir.iterdir()
                     if p.name not in RUN_FILES and not p.name.startswith("."))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ckpt_mod.CheckpointError(
            f"--out {run_dir} is not empty and not a qponder run folder (it holds {shown}) — "
            "choose a new or empty folder")


class Run:
    """One training run's folder and what is written to it."""

    def __init__(self, cfg, stage: str, *, resume: bool, world: World,
                 must_match: Sequence[str]):
        self.cfg, self.stage, self.world = cfg, stage, world
        self.is_main = world.is_main
        run_dir = Path(cfg.out)
        if not resume:
            refuse_foreign_folder(run_dir)
        self.dir, self.checkpoint = ckpt_mod.open_run(run_dir, resume, world.is_main)
        if resume and self.checkpoint is None:
            say(f"--resume: no checkpoint in {self.dir}; starting from step 0")
        if self.checkpoint is not None:
            now, saved = config_dict(cfg), self.checkpoint.config
            for key in must_match:
                if now.get(key) != saved.get(key):
                    raise ckpt_mod.CheckpointError(
                        f"--resume: {key} is {now.get(key)!r} here but {saved.get(key)!r} in "
                        f"{self.checkpoint.path} — resume with the run's settings (or start a "
                        "new --out)")
        self.start = self.checkpoint.step if self.checkpoint else 0
        self.state = dict(self.checkpoint.state) if self.checkpoint else {}
        self.problems_path = self.dir / PROBLEMS_FILE
        self.log: MetricsLog | None = None
        self.t0 = time.perf_counter()

    def data_order(self, lengths: list[int], batch_size: int, seed: int) -> DataOrder:
        """The run's seeded data order, at the checkpoint's cursor when resuming."""
        return DataOrder(lengths, batch_size, seed,
                         state=self.checkpoint.state.get("data") if self.checkpoint else None)

    def restore(self, model: nn.Module, optimizer, adapter_cfg: dict) -> None:
        """Adapter weights, optimizer state and RNG from the checkpoint being resumed (if any)."""
        if self.checkpoint is None:
            return
        ckpt_mod.restore_checkpoint(self.checkpoint, model, optimizer)
        say(f"resumed from {self.checkpoint.path} (step {self.start})")
        if self.is_main:  # they may lag the checkpoint (a kill between the two writes)
            ckpt_mod.write_run_adapters(self.dir, model, adapter_cfg)

    def begin(self) -> None:
        """config.json and a metrics log that drops the rows a resumed checkpoint does not cover
        (call once the run is ready to train)."""
        if self.is_main:
            save_config(self.cfg, self.dir)
        self.log = MetricsLog(self.dir, resume_step=self.start if self.checkpoint else None,
                              enabled=self.is_main)

    def record_problems(self, rows: Sequence[dict]) -> None:
        """The problems found when reading the data: written once, by a fresh run."""
        if self.checkpoint is not None or not self.is_main:
            return
        self.problems_path.unlink(missing_ok=True)
        for row in rows:
            append_jsonl(self.problems_path, row)

    def problem(self, row: dict) -> None:
        """A problem met while training (an image that fails at run time)."""
        if self.is_main:
            append_jsonl(self.problems_path, row)

    def save(self, step: int, model: nn.Module, adapter_cfg: dict, optimizer,
             order: DataOrder) -> None:
        """Checkpoint `step` (with the data order and the run's bad-step count) and refresh
        adapters/."""
        if self.is_main:
            state = {"data": order.state(), "bad_steps": self.state.get("bad_steps", 0)}
            ckpt_mod.save_run(self.dir, step, model, adapter_cfg, optimizer, state,
                              config_dict(self.cfg), self.cfg.keep_checkpoints, ADAPTERS_DIR)

    def curves(self, charts=None) -> None:
        if self.is_main:
            title = f"{self.stage.upper()} {self.dir.name}"
            write_curves(self.dir, title, **({"charts": charts} if charts else {}))

    def finish(self, summary: dict) -> None:
        if self.is_main:
            atomic_write_json(self.dir / SUMMARY_FILE, {
                "steps": self.cfg.iters, "resumed_from": self.start,
                "seconds": round(time.perf_counter() - self.t0, 2),
                "peak_memory_gb": round(peak_memory_gb(), 4),
                "adapters": str(self.dir / ADAPTERS_DIR), **summary})


# ---------------------------------------------------------------- stop signals


@contextmanager
def stop_signals(notify: Callable[[str], None] = say) -> Iterator[Callable[[], int | None]]:
    """Yields `requested()`: the signal number once SIGINT or SIGTERM arrived, else None.

    The first signal only sets it, so the loop finishes the step, checkpoints and exits cleanly
    (a KeyboardInterrupt in the middle of an optimizer update could leave adapters and optimizer
    state out of step); a second SIGINT interrupts at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None  # handlers can only be set from the main thread
        return
    got: list[int] = []

    def handler(signum, frame):
        if got and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not got:
            got.append(signum)
            notify(f"{SIGNAL_NAMES.get(signum, signum)}: stopping after this step (checkpoint "
                   "first); Ctrl-C again to abort now")

    previous = {s: signal.signal(s, handler) for s in SIGNAL_NAMES}
    try:
        yield lambda: got[0] if got else None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- the loop


def mean_row(rows: Sequence[dict]) -> dict:
    """The mean of each numeric metric over a report window's steps."""
    keys = [k for k, v in rows[-1].items() if isinstance(v, (int, float))
            and not isinstance(v, bool)]
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


def train_loop(run: Run, loop: LoopSettings, step: Callable[[int], StepOutcome],
               save: Callable[[int], None], *, report: Callable[[list[StepOutcome]], dict],
               after_step: Callable[[int], None] | None = None,
               on_step: Callable[[int, dict], None] | None = None,
               charts=None) -> int:
    """Steps run.start + 1 .. loop.iters; returns the number of skipped (non-finite) steps.

    `report(outcomes)` turns a window's applied steps into its metrics.jsonl row;
    `after_step(n)` runs after each step's progress line (SFT's validation); `on_step(n, info)`
    after the checkpoint of step n (benches time steps with it; experiments read the weights).
    """
    bad = int(run.state.get("bad_steps", 0))
    consecutive = 0
    window: list[StepOutcome] = []
    with progress_bar(loop.iters, run.stage, unit="step", completed=run.start,
                      enabled=loop.progress and run.is_main) as advance, \
            stop_signals() as requested:
        for n in range(run.start + 1, loop.iters + 1):
            out = step(n)
            if out.applied:
                consecutive = 0
                window.append(out)
            else:
                bad += 1
                consecutive += 1
                run.log.append({"step": n, "kind": "skip", "loss": out.loss,
                                "reason": "non-finite loss or gradient"})
                say(f"step {n}: non-finite loss/gradient — step skipped, adapters unchanged")
                if consecutive >= loop.max_bad_steps:
                    raise FloatingPointError(
                        f"{consecutive} consecutive steps with NaN/inf loss or gradients — lower "
                        "learning_rate (the last good state is in the checkpoints)")
            run.state["bad_steps"] = bad
            if (n % loop.steps_per_report == 0 or n == loop.iters) and window:
                run.log.append({"step": n, "kind": "train", **report(window)})
                window = []
            advance(1, **out.status)
            if after_step is not None:
                after_step(n)
            stop = requested()
            saved = n % loop.steps_per_save == 0 or n == loop.iters or stop is not None
            if saved:
                save(n)
                run.curves(charts)
            if on_step is not None:
                on_step(n, {"loss": out.loss, "applied": out.applied, **out.metrics})
            stop = requested()
            if stop is not None:
                if not saved:  # the signal came during on_step
                    save(n)
                    run.curves(charts)
                raise RunStopped(n, stop, run.dir)
    return bad

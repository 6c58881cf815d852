"""Atomic, resumable training checkpoints.

A checkpoint is one folder, `run/checkpoints/step_0000100/`:

    adapters.safetensors + adapter_config.json   the adapter (loads in stock mlx-vlm as is)
    optimizer.safetensors                        the optimizer state tree (step, Adam moments)
    state.json                                   step, RNG states, data order and cursor, extras
    config.json                                  the run config that wrote it

It is written into a hidden temp folder, every file fsynced, then renamed into place, so a
folder with a final name is always complete; a crash mid-save leaves only a `.tmp-*` folder,
which the next save removes. The newest K checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from qponder_mlx.io import atomic_write_json
from qponder_mlx.train.lora import (
    ADAPTER_WEIGHTS,
    _fsync_dir,
    load_adapter_weights,
    save_adapters,
    save_safetensors_atomic,
)

CHECKPOINTS = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
_NAME = re.compile(r"step_(\d{7,})")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]  # state.json: rng, data order/cursor, whatever the trainer stored
    config: dict[str, Any]


def rng_state() -> dict[str, Any]:
    """Python and NumPy global RNG states as JSON (mx.random is reseeded per step instead:
    its global key cannot be set back, so trainers derive it from (seed, step))."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}


def set_rng_state(state: dict[str, Any]) -> None:
    if "python" in state:
        v, inner, g = state["python"]
        random.setstate((v, tuple(inner), g))
    if "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def step_seed(seed: int, step: int) -> int:
    """The mx.random seed of one optimizer step: resumable without saving MLX's key."""
    return (seed * 1_000_003 + step) % (2**31)


def _checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.fullmatch(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    return [p for _, p in _checkpoint_dirs(Path(run_dir))]


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, adapter_config: dict,
                    optimizer, state: dict[str, Any], config: dict[str, Any],
                    keep: int = 3) -> Path:
    """Write checkpoint `step` atomically; keep the newest `keep` of them. Returns its folder."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # a save that died half-way
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}-{os.getpid()}"
    tmp.mkdir()
    try:
        save_adapters(model, adapter_config, tmp)
        opt = dict(tree_flatten(optimizer.state))
        save_safetensors_atomic(tmp / OPTIMIZER_FILE, opt)
        atomic_write_json(tmp / CONFIG_FILE, config)
        # state.json last: its presence marks the folder complete.
        atomic_write_json(tmp / STATE_FILE, {"step": step, "rng": rng_state(), **state})
        _fsync_dir(tmp)
        if final.exists():  # a re-run of the same step (after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _checkpoint_dirs(Path(run_dir))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_run(run_dir: str | Path, step: int, model: nn.Module, adapter_config: dict, optimizer,
             state: dict[str, Any], config: dict[str, Any], keep: int,
             adapters_dir: str = "adapters") -> None:
    """Checkpoint `step` and refresh the run's current adapters (what eval/score/export load)."""
    save_checkpoint(run_dir, step, model, adapter_config, optimizer, state, config, keep=keep)
    write_run_adapters(run_dir, model, adapter_config, adapters_dir)


def write_run_adapters(run_dir: str | Path, model: nn.Module, adapter_config: dict,
                       adapters_dir: str = "adapters") -> None:
    """The run's current adapters (`save_run`'s second half). Trainers call it on resume too: a
    kill after the newest checkpoint was written but before these were refreshed leaves them one
    checkpoint behind, and a resume from the final step runs no step that would rewrite them."""
    save_adapters(model, adapter_config, Path(run_dir) / adapters_dir)


def read_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}) — "
                              "delete the folder to fall back to the previous one") from None
    return Checkpoint(path=path, step=int(state["step"]), state=state, config=config)


def load_latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint of a run folder, or None if it has none."""
    dirs = _checkpoint_dirs(Path(run_dir))
    return read_checkpoint(dirs[-1][1]) if dirs else None


def open_run(out: str | Path, resume: bool, is_main: bool = True
             ) -> tuple[Path, Checkpoint | None]:
    """The run folder and, with `resume`, its newest checkpoint.

    A fresh run refuses a folder that already holds checkpoints (they would be mixed with new
    ones). Only the main process creates the folder: other distributed ranks write nothing.
    """
    run_dir = Path(out)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = load_latest_checkpoint(run_dir) if resume else None
    if not resume and list_checkpoints(run_dir):
        raise CheckpointError(f"{run_dir} already holds checkpoints — pass --resume to "
                              "continue that run, or choose another --out")
    return run_dir, ckpt


def restore_checkpoint(ckpt: Checkpoint, model: nn.Module, optimizer) -> None:
    """Load adapter weights, optimizer state and Python/NumPy RNG states from `ckpt`."""
    load_adapter_weights(model, ckpt.path / ADAPTER_WEIGHTS)
    opt = mx.load(str(ckpt.path / OPTIMIZER_FILE))
    optimizer.state = tree_unflatten(list(opt.items()))
    mx.eval(optimizer.state)
    set_rng_state(ckpt.state.get("rng", {}))

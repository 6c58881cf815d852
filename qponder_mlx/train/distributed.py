"""Data parallelism over several Macs with MLX's own distributed layer (`mx.distributed`).

`qponder train` runs unchanged under `mlx.launch --backend ring -n N -- qponder train ...`: every
rank holds the same model, takes its share of each global batch, and the gradients (only the
LoRA tensors) are summed across ranks before one identical update everywhere. Without a launcher
the group has size 1 and every call here is a no-op, so single-process results do not change.

A rank that dies makes the ring raise "connection to a peer was lost" on the others; a rank that
hangs would block them forever, so each collective runs under a watchdog that stops the process
with a clear error after `QPONDER_DIST_TIMEOUT` seconds (default 1800).
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RuntimeError):
    """A collective failed: a peer died or stopped answering."""


@dataclass
class World:
    group: Any  # mx.distributed.Group or None (single process)
    rank: int = 0
    size: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics, pictures and summaries."""
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of a global batch (round-robin, so shares differ by at most one)."""
        return items[self.rank::self.size]

    @contextmanager
    def _watch(self, what: str):
        def expire():
            sys.stderr.write(f"error: rank {self.rank}: no answer from the other ranks for "
                             f"{self.timeout_s:.0f} s during {what} — a rank died or hangs; "
                             "stopping (resume from the last checkpoint with --resume)\n")
            sys.stderr.flush()
            os._exit(3)

        timer = threading.Timer(self.timeout_s, expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        except RuntimeError as e:
            raise DistributedError(
                f"rank {self.rank}: {what} failed ({e}) — another rank stopped; resume from the "
                "last checkpoint with --resume") from None
        finally:
            timer.cancel()

    def sum_tree(self, tree, what: str = "gradient all-reduce"):
        """Σ over ranks of every array in a (nested) tree; identity on one process."""
        if self.size == 1:
            return tree
        flat = tree_flatten(tree)
        with self._watch(what):
            summed = [(k, mx.distributed.all_sum(v, group=self.group)) for k, v in flat]
            mx.eval([v for _, v in summed])
        return tree_unflatten(summed)

    def sum(self, values: dict[str, float], what: str = "metrics all-reduce") -> dict[str, float]:
        """Σ over ranks of named scalars (one collective for all of them)."""
        if self.size == 1:
            return dict(values)
        keys = sorted(values)
        with self._watch(what):
            out = mx.distributed.all_sum(mx.array([float(values[k]) for k in keys]),
                                         group=self.group)
            mx.eval(out)
        return dict(zip(keys, out.tolist()))

    def barrier(self, what: str = "barrier") -> None:
        self.sum({"_": 0.0}, what)

    def union(self, items: set[int], universe: int, what: str = "data-order sync") -> set[int]:
        """The union over ranks of a set of row indices in [0, universe)."""
        if self.size == 1:
            return set(items)
        mask = mx.zeros((universe,), dtype=mx.float32)
        if items:
            mask[mx.array(sorted(items))] = 1.0
        merged = self.sum_tree({"m": mask}, what)["m"]
        return {int(i) for i, v in enumerate(merged.tolist()) if v > 0}

    def mean_metrics(self, metrics: dict[str, float], n: int) -> dict[str, float]:
        """Metrics averaged over ranks, each rank weighted by its n items; NaNs left out."""
        if self.size == 1:
            return dict(metrics)
        flat: dict[str, float] = {}
        for k, v in metrics.items():
            ok = isinstance(v, (int, float)) and v == v and abs(v) != float("inf")
            flat[f"{k}.s"] = float(v) * n if ok else 0.0
            flat[f"{k}.n"] = float(n) if ok else 0.0
        tot = self.sum(flat)
        return {k: (tot[f"{k}.s"] / tot[f"{k}.n"] if tot[f"{k}.n"] else float("nan"))
                for k in metrics}


def init_world(timeout_s: float | None = None) -> World:
    """The global group if a launcher set one up (MLX_RANK/MLX_HOSTFILE, MPI), else size 1."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("QPONDER_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    launched = any(k in os.environ for k in ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_RANK",
                                               "PMI_RANK"))
    if not launched or not mx.distributed.is_available():
        return World(None, timeout_s=timeout_s)
    group = mx.distributed.init()
    return World(group, group.rank(), group.size(), timeout_s)

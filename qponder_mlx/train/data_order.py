"""The order a run reads its rows in: seeded, length-bucketed, resumable (SFT and GRPO)."""

from __future__ import annotations

import numpy as np


class DataOrderError(ValueError):
    """No row is left to train on."""


class DataOrder:
    """Which rows each batch takes, reproducible from (seed, epoch) and resumable by cursor.

    Each epoch shuffles the rows, sorts windows of 16 batches by length (less padding), cuts
    batches and shuffles their order. Rows that failed to encode at run time are left out of
    later epochs.
    """

    WINDOW = 16

    def __init__(self, lengths: list[int], batch_size: int, seed: int,
                 state: dict | None = None):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.bad: set[int] = set()
        self.epoch, self.cursor = 0, 0
        self.batches: list[list[int]] = []
        if state:
            self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
            self.bad = set(state.get("bad", []))
            self.batches = [list(b) for b in state["batches"]]
        else:
            self.batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        rows = [int(i) for i in rng.permutation(len(self.lengths)) if int(i) not in self.bad]
        bs, win = self.batch_size, self.batch_size * self.WINDOW
        batches = []
        for s in range(0, len(rows), win):
            chunk = sorted(rows[s:s + win], key=lambda i: self.lengths[i])
            batches.extend(chunk[j:j + bs] for j in range(0, len(chunk), bs))
        return [batches[int(k)] for k in rng.permutation(len(batches))]

    def next(self) -> list[int]:
        if len(self.bad) >= len(self.lengths):
            raise DataOrderError("every training row failed to load — see data_problems.jsonl")
        while True:
            if self.cursor >= len(self.batches):
                self.epoch += 1
                self.cursor = 0
                self.batches = self._epoch_batches(self.epoch)
            batch = [i for i in self.batches[self.cursor] if i not in self.bad]
            self.cursor += 1
            if batch:
                return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "bad": sorted(self.bad),
                "batches": self.batches}

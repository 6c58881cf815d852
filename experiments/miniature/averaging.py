"""Weight averaging: a run's adapters as the mean of its weights at evenly spaced steps.

Why: GRPO's held-out SRCC swings by about ±0.05 between checkpoints ten steps apart in the
miniature reproduction (docs/reproduction.md, History AK), so "the last step" is a noisy pick.
The mean of the weights along the trajectory (stochastic weight averaging, Izmailov et al.
2018; Polyak averaging with a uniform window) sits in the middle of that swing.

LoRA's A and B are averaged separately, so the mean adapter's update is mean(B)·mean(A), not
mean(B·A). Every averaged point starts from the same adapter and moves little at GRPO's
learning rate, so the difference is second order in the distance moved (0.12 % of the mean
update over six GRPO checkpoints of the miniature, seeds 0 and 1); the mean stays an ordinary
adapter that every loader reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from qponder_mlx.train.checkpoint import CheckpointError

AVERAGE_FILE = "average.safetensors"  # in a checkpoint folder; its count is in state.json


@dataclass
class WeightAverage:
    """Running mean of the trainable weights taken after every `every`-th step (0: off)."""

    every: int = 0
    mean: dict[str, mx.array] = field(default_factory=dict)
    count: int = 0

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def add(self, weights: dict[str, mx.array]) -> None:
        """Fold one point in: mean_n = mean_{n-1} + (w - mean_{n-1}) / n."""
        self.count += 1
        if self.count == 1:
            self.mean = dict(weights)
        else:
            if weights.keys() != self.mean.keys():
                raise ValueError("weights to average do not match the running mean's tensors")
            self.mean = {k: m + (weights[k] - m) / self.count for k, m in self.mean.items()}
        mx.eval(self.mean)

    def weights(self) -> dict[str, mx.array] | None:
        """The averaged weights, or None before the first point (use the model's own)."""
        return self.mean if self.count else None

    def state(self) -> dict[str, int]:
        return {"average_count": self.count, "average_every": self.every}

    def restore(self, checkpoint_dir: Path, state: dict) -> None:
        """Pick up the mean a checkpoint saved; a checkpoint without one restarts it empty."""
        count = int(state.get("average_count", 0))
        saved_every = int(state.get("average_every", self.every))
        if count and saved_every != self.every:
            raise CheckpointError(f"{checkpoint_dir}: saved with average_every = {saved_every}, "
                                  f"this run has {self.every} — resume with the same setting")
        path = Path(checkpoint_dir) / AVERAGE_FILE
        if count and not path.exists():
            raise CheckpointError(f"{path}: missing, but state.json counts {count} averaged "
                                  "steps — restore it or resume from an earlier checkpoint")
        self.count = count
        self.mean = dict(mx.load(str(path))) if count else {}

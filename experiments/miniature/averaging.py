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

import mlx.core as mx


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

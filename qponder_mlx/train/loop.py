"""Pieces SFT's and GRPO's steps share: optimizer and schedule, gradient checkpointing, the guarded
update that never writes a NaN into the adapters, and memory/speed readings (the loop around the
steps is `runner.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

# ---------------------------------------------------------------- optimizer


def lr_schedule(learning_rate: float, iters: int, warmup: int = 0, kind: str = "cosine",
                min_learning_rate: float = 0.0):
    """Linear warmup from 0 over `warmup` steps, then cosine down to `min_learning_rate` at
    `iters` (or constant). Indexed by the optimizer's update count (0 for the first update)."""
    if kind == "constant":
        main = lambda step: mx.array(learning_rate, dtype=mx.float32)  # noqa: E731
    elif kind == "cosine":
        main = optim.cosine_decay(learning_rate, max(1, iters - warmup), min_learning_rate)
    else:
        raise ValueError(f"lr schedule must be cosine or constant, got {kind!r}")
    if warmup <= 0:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, learning_rate, warmup), main],
                                [warmup])


def make_optimizer(cfg, updates: int) -> tuple[optim.Optimizer, object]:
    """AdamW on `cfg`'s schedule over `updates` optimizer updates; returns it and the schedule
    (`schedule(optimizer.step)` is the learning rate of the next update)."""
    from qponder_mlx.train.config import warmup_steps

    schedule = lr_schedule(cfg.learning_rate, updates, warmup_steps(cfg), cfg.lr_schedule,
                           cfg.min_learning_rate)
    return optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay), schedule


# ---------------------------------------------------------------- gradient checkpointing


def enable_grad_checkpoint(layers) -> None:
    """Recompute each layer's activations in the backward pass (`mx.checkpoint`).

    Only these instances change (each gets a one-off subclass), not the layer class, so a second
    model in the same process — a GRPO reference, a bench baseline — is untouched; parameter
    names stay the same, so adapters save and load as usual.
    """
    for layer in layers:
        cls = type(layer)
        if getattr(cls, "_qponder_checkpointed", False):
            continue
        if cls not in _CHECKPOINTED:
            _CHECKPOINTED[cls] = type(cls.__name__, (cls,), {
                "__call__": _checkpointed_call(cls.__call__), "_qponder_checkpointed": True})
        layer.__class__ = _CHECKPOINTED[cls]


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_call(base_call):
    def __call__(self, *args, **kwargs):
        def inner(params, *a, **k):
            # The trainable parameters enter as inputs so their gradients flow through the
            # recomputation; frozen weights are constants of the closure.
            self.update(params)
            return base_call(self, *a, **k)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    return __call__


# ---------------------------------------------------------------- the guarded update


def scale_tree(tree, factor: float):
    return tree_map(lambda g: g * factor, tree)


def zeros_like_tree(tree):
    return tree_map(mx.zeros_like, tree)


def add_trees(a, b):
    return b if a is None else tree_map(lambda x, y: x + y, a, b)


def guarded_update(model: nn.Module, optimizer: optim.Optimizer, loss: mx.array, grads,
                   max_norm: float | None) -> tuple[bool, float]:
    """Clip (mlx's `clip_grad_norm`) and apply `grads` unless the loss or the gradient norm is
    NaN/inf.

    Returns (applied, grad_norm). A skipped step leaves adapters and optimizer state untouched:
    one bad batch costs one step, never the run.
    """
    clipped, norm = optim.clip_grad_norm(grads, max_norm if max_norm is not None else math.inf)
    mx.eval(loss, norm)
    norm_f, loss_f = float(norm.item()), float(loss.item())
    if not (math.isfinite(norm_f) and math.isfinite(loss_f)):
        return False, norm_f
    optimizer.update(model, clipped if max_norm is not None else grads)
    mx.eval(model.trainable_parameters(), optimizer.state)
    return True, norm_f


# ---------------------------------------------------------------- readings


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


@dataclass
class Window:
    """Sums over a reporting window: loss weighted by supervised tokens, throughput over the
    training steps themselves (data encoding included; validation and checkpoints not)."""

    loss_sum: float = 0.0
    supervised: int = 0
    tokens: int = 0  # real (non-padding) input tokens, image tokens included
    steps: int = 0
    seconds: float = 0.0
    norm_sum: float = 0.0

    def add(self, loss: float, supervised: int, tokens: int, norm: float,
            seconds: float) -> None:
        self.loss_sum += loss * supervised
        self.supervised += supervised
        self.tokens += tokens
        self.steps += 1
        self.seconds += seconds
        self.norm_sum += norm

    def row(self) -> dict:
        secs = max(self.seconds, 1e-9)
        return {"loss": self.loss_sum / max(self.supervised, 1),
                "grad_norm": self.norm_sum / max(self.steps, 1),
                "tokens": self.tokens, "supervised_tokens": self.supervised,
                "tokens_per_s": self.tokens / secs, "steps_per_s": self.steps / secs,
                "peak_memory_gb": round(peak_memory_gb(), 4)}

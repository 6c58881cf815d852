"""GRPO advantages and clipped policy-gradient loss, matching TRL's GRPOTrainer.

Per token t of completion i (ratio r = exp(logp - old_logp), A_i the group-relative advantage):

    loss_it = -min(r·A_i, clip(r, 1-ε_low, 1+ε_high)·A_i) + β·(exp(ref - logp) - (ref - logp) - 1)

and the reduction over tokens depends on `loss_type`:
    grpo     mean over sequences of each sequence's masked token mean
    bnpo     masked sum / number of active tokens
    dapo     masked sum / number of active tokens (TRL normalises by the global count across
             processes; on one process it equals bnpo)
    dr_grpo  masked sum / (B · max_completion_length)
"""

from __future__ import annotations

import mlx.core as mx

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
SCALES = ("group", "batch", "none")


def group_advantages(rewards: mx.array, group_size: int, *, scale: str = "group",
                     eps: float = 1e-4) -> mx.array:
    """A = r - group mean, divided by (unbiased std + eps) of the group or the batch, or not.

    `rewards` is flat (B·G,) with each group's G rewards contiguous. A group whose rewards are
    all equal gets zeros (its deviations are 0 and eps keeps the division finite).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    r = mx.array(rewards, dtype=mx.float32).reshape(-1)
    if group_size < 1 or r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of {group_size}")
    grouped = r.reshape(-1, group_size)
    mean = grouped.mean(axis=1, keepdims=True)
    adv = grouped - mean
    if scale == "group":
        std = mx.sqrt(((grouped - mean) ** 2).sum(axis=1, keepdims=True)
                      / max(group_size - 1, 1))
        adv = adv / (std + eps)
    elif scale == "batch":
        std = mx.sqrt(((r - r.mean()) ** 2).sum() / max(r.size - 1, 1))
        adv = adv / (std + eps)
    return adv.reshape(-1)


def per_token_terms(logps: mx.array, old_logps: mx.array, ref_logps: mx.array | None,
                    advantages: mx.array, *, beta: float, epsilon_low: float,
                    epsilon_high: float) -> tuple[mx.array, dict[str, mx.array]]:
    """The (B, T) per-token loss and the (B, T) quantities its metrics are made of."""
    ratio = mx.exp(logps - old_logps)
    adv = advantages.reshape(-1, 1)
    unclipped = ratio * adv
    clipped = mx.clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv
    loss = -mx.minimum(unclipped, clipped)
    parts = {
        "low_clip": ((ratio < 1 - epsilon_low) & (adv < 0)).astype(mx.float32),
        "high_clip": ((ratio > 1 + epsilon_high) & (adv > 0)).astype(mx.float32),
    }
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        d = ref_logps - logps
        kl = mx.exp(d) - d - 1
        loss = loss + beta * kl
        parts["kl"] = kl
    return loss, parts


def reduce_tokens(values: mx.array, mask: mx.array, loss_type: str, *,
                  max_completion_length: int | None = None, n_rows: int | None = None,
                  n_tokens: int | mx.array | None = None) -> mx.array:
    """Reduce a (B, T) per-token quantity to a scalar the way `loss_type` prescribes.

    `n_rows` / `n_tokens` default to this batch's; pass the whole batch's totals to reduce one
    chunk of it, so that the chunks' results add up to the whole batch's (gradient accumulation
    over images gives exactly the full-batch loss).
    """
    m = mask.astype(mx.float32)
    total = (values * m).sum()
    n_rows = values.shape[0] if n_rows is None else n_rows
    if loss_type == "grpo":
        per_seq = (values * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1.0)
        return per_seq.sum() / n_rows
    if loss_type in ("bnpo", "dapo"):
        return total / mx.maximum(m.sum() if n_tokens is None else n_tokens, 1.0)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        return total / (n_rows * max_completion_length)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def masked_mean(values: mx.array, mask: mx.array) -> mx.array:
    m = mask.astype(mx.float32)
    return (values * m).sum() / mx.maximum(m.sum(), 1.0)


def grpo_loss(logps: mx.array, old_logps: mx.array, ref_logps: mx.array | None,
              mask: mx.array, advantages: mx.array, *, beta: float = 0.0,
              epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "dapo",
              max_completion_length: int | None = None) -> tuple[mx.array, dict[str, mx.array]]:
    """Clipped GRPO loss over (B, T) completion tokens; returns (loss, metrics).

    Metrics: `kl` (masked token mean, when beta != 0), `clip_ratio_low`, `clip_ratio_high`,
    `clip_ratio` (masked token means of the clipped indicators, as TRL logs them).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    per_token, parts = per_token_terms(logps, old_logps, ref_logps, advantages, beta=beta,
                                       epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    loss = reduce_tokens(per_token, mask, loss_type,
                         max_completion_length=max_completion_length)
    low, high = masked_mean(parts["low_clip"], mask), masked_mean(parts["high_clip"], mask)
    metrics = {"clip_ratio_low": low, "clip_ratio_high": high, "clip_ratio": low + high}
    if "kl" in parts:
        metrics["kl"] = masked_mean(parts["kl"], mask)
    return loss, metrics

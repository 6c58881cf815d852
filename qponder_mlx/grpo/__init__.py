"""Stage 2: GRPO with group sampling (Q-Ponder). See docs/method.md."""

from qponder_mlx.grpo.loss import group_advantages, grpo_loss

__all__ = ["group_advantages", "grpo_loss"]

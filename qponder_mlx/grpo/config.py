"""GRPO settings: one dataclass that a TOML file and `qponder train --stage grpo` flags fill.

Names follow TRL's `GRPOConfig` where TRL has the setting (`num_iterations`, `beta`,
`epsilon_low`/`epsilon_high`, `loss_type`, `scale_rewards`, `temperature`, `top_p`,
`max_completion_length`); TRL calls the group size `num_generations`, mlx-vlm's GRPO trainer
`group_size`, as here. configs/*.toml are the recipes for real models, every value explained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qponder_mlx.grpo.loss import LOSS_TYPES, SCALES
from qponder_mlx.grpo.rewards import RewardConfig
from qponder_mlx.model import DEFAULT_MODEL
from qponder_mlx.train.config import ConfigError, LoraConfig, check_common


@dataclass
class GRPOConfig:
    model: str = DEFAULT_MODEL  # repo id or folder; float or already quantized
    # The SFT adapter to start from (a run's `adapters/`): GRPO refines a cold-started policy
    # (Q-Ponder, arXiv 2506.05384, §3.2); without one a fresh LoRA (`lora`) starts at the base.
    adapter: str | None = None
    data: str = ""  # images with MOS: any label file `load_labels` reads
    data_format: str = "auto"
    images_root: str | None = None
    out: str = "runs/grpo"
    iters: int = 200  # optimizer steps; each rolls out once (x num_iterations updates)
    batch_size: int = 2  # images per step (B); each gets a group of G samples
    # G: samples per image. Advantages compare the samples of one image, so G >= 2; more gives a
    # steadier baseline at G times the rollout cost (DeepSeekMath's GRPO used 64, Q-Insight 8).
    group_size: int = 8
    # μ: updates per rollout, each against the policy that sampled (the clipped ratio); 1 =
    # on-policy, as TRL's default.
    num_iterations: int = 1
    learning_rate: float = 1e-5  # AdamW peak; TRL's GRPO default is 1e-6 for full fine-tuning
    min_learning_rate: float = 0.0  # where the cosine ends
    warmup: int = 0  # linear warmup steps
    lr_schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max global gradient norm (mlx's clip_grad_norm); None = off
    # β: weight of the per-token KL estimate exp(ref - logp) - (ref - logp) - 1 to the reference
    # (Schulman's k3, TRL's formula); 0.04 is TRL's and DeepSeekMath's value.
    beta: float = 0.04
    # The KL reference: "initial" = the policy as this run started (the --adapter's weights,
    # TRL's choice: the model it was given), "base" = the same weights with adapters off.
    reference: str = "initial"
    # The ratio's clip range [1 - epsilon_low, 1 + epsilon_high] (PPO's ε = 0.2; DAPO, arXiv
    # 2503.14476, raises only the upper bound, e.g. 0.28, to keep exploring).
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "dapo"  # grpo | bnpo | dapo | dr_grpo: how token losses reduce (loss.py)
    # Advantage normalisation: "group" divides by each group's std (GRPO), "batch" by the
    # batch's, "none" leaves it (Dr. GRPO, arXiv 2503.20783, argues it biases easy prompts).
    scale_rewards: str = "group"
    temperature: float = 1.0  # rollout sampling; log-probs are taken at the same temperature
    top_p: float = 1.0
    max_completion_length: int = 256  # tokens per sampled answer (reasoning + score)
    # Memory: decode at most this many rows at once. The caches are sized once for
    # max_completion_length, so peak memory grows with it (bench/grpo_speed.py).
    max_rows: int = 16
    # Memory: completions differentiated together; fewer = less memory, same gradient (tested;
    # >= G: the whole group in one backward pass).
    loss_rows: int = 2
    rewards: RewardConfig = field(default_factory=RewardConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # used when no --adapter is given
    quantize_base: int | None = None  # 4 or 8: QLoRA on a float base
    quantize_group_size: int = 64
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 512 * 28 * 28
    seed: int = 0
    steps_per_report: int = 1
    steps_per_save: int = 20
    keep_checkpoints: int = 3
    max_bad_steps: int = 20  # consecutive NaN/inf steps before the run stops
    progress: bool = True

    def validate(self) -> None:
        self.lora.validate()
        if not self.data:
            raise ConfigError("data is not set — pass --data LABELS (or data = ... in the TOML)")
        check_common(self)
        for name in ("num_iterations", "max_completion_length", "max_rows", "loss_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (advantages compare samples within a "
                              f"group), got {self.group_size}")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALES:
            raise ConfigError(f"scale_rewards must be one of {SCALES}, got "
                              f"{self.scale_rewards!r}")
        if self.lora.dropout:
            # The old-policy ratio must be exact: dropout would make rollout and update differ.
            raise ConfigError("lora.dropout must be 0 for GRPO")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.reference not in ("initial", "base"):
            raise ConfigError(f"reference must be 'initial' or 'base', got {self.reference!r}")
        for name in ("beta", "epsilon_low", "epsilon_high"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")

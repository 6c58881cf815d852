"""GRPO settings: one dataclass that a TOML file and `qponder train --stage grpo` flags fill."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qponder_mlx.grpo.loss import LOSS_TYPES, SCALES
from qponder_mlx.grpo.rewards import RewardConfig
from qponder_mlx.model import DEFAULT_MODEL
from qponder_mlx.train.config import ConfigError, LoraConfig


@dataclass
class GRPOConfig:
    model: str = DEFAULT_MODEL  # repo id or folder; float or already quantized
    adapter: str | None = None  # the SFT adapter to start from (a run's `adapters/` folder)
    data: str = ""  # images with MOS: any label file `load_labels` reads
    data_format: str = "auto"
    images_root: str | None = None
    out: str = "runs/grpo"
    iters: int = 200  # optimizer steps (x num_iterations updates per rollout)
    batch_size: int = 2  # images per step (B); each gets a group of G samples
    group_size: int = 8  # G
    num_iterations: int = 1  # μ: updates per rollout, with the old-policy ratio
    learning_rate: float = 1e-5
    min_learning_rate: float = 0.0
    warmup: int = 0
    lr_schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    beta: float = 0.04  # KL to the reference policy
    # The reference: "initial" = the policy as this run started (the --adapter's weights after a
    # cold start; TRL's choice), "base" = the same weights with adapters off.
    reference: str = "initial"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "dapo"  # grpo | bnpo | dapo | dr_grpo (TRL's definitions)
    scale_rewards: str = "group"  # group | batch | none
    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_length: int = 256
    # False: the answer's digits after the point get no gradient of their own (masked out of
    # the loss, KL included). GRPO moved every answer's first decimal to one shared digit
    # (docs/reproduction.md, History AJ); this keeps them nearer where the cold start put them.
    train_decimals: bool = True
    # False: the answer's whole number is out of the loss (train_decimals then does not matter),
    # so GRPO can raise a reward only through the reasoning that leads to the number. Why: in the
    # miniature GRPO re-mapped the number written after a level phrase instead of choosing the
    # right phrase (docs/reproduction.md, History AQ, AU).
    train_answer: bool = True
    # 0: the run's adapters are the last step's weights. N: they are the mean of the weights
    # after steps N, 2N, ... (the last step's stay in adapters_last/). GRPO's held-out SRCC
    # swings between nearby steps; the mean sits in the middle (docs/reproduction.md, AL).
    average_every: int = 0
    # Decode at most this many rows at once (a memory bound): 16 = the default step's B=2
    # groups of 8 in one decode, whose caches are sized once for max_completion_length
    # (generate.decode). On the bench's model 8 rows save ~6 % of the step's peak memory and
    # cost 1.3x the rollout time (docs/bench_grpo.md, 2026-12-03).
    max_rows: int = 16
    # "" = batches mix any images. A regex: a step's images share the text it matches in their
    # ids (its first group if it has one), e.g. "_(blur|noise|jpeg)_" for one distortion type
    # per step. Why: the rank reward then only compares images that differ in level, not type
    # (docs/reproduction.md, History BI).
    batch_by: str = ""
    # "" = GRPO updates every trainable weight. A regex over the weights' names (as in
    # adapters.safetensors, e.g. "lm_head"): only those it matches move; the others' gradients
    # are zeroed before clipping. Why: GRPO re-mapped the number written after each phrase per
    # image, which fits the training photos and costs order within a distortion type; the head
    # alone can shift a type's answers but hardly memorise an image. In the miniature it traded
    # offsets for order as the whole LoRA does (docs/reproduction.md, BL), so it is off.
    train_only: str = ""
    # Completions differentiated together; fewer = less memory, same gradient (>= G: one pass).
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

    def untrained_answer_part(self) -> str | None:
        """Which part of the answer's number GRPO leaves out of its loss: "number", "decimals"
        or None (all of it trained)."""
        if not self.train_answer:
            return "number"
        return None if self.train_decimals else "decimals"

    def batch_keys(self, ids: list[str]) -> list[str] | None:
        """Each image's batch key under `batch_by` (None when batches mix any images)."""
        if not self.batch_by:
            return None
        pattern, keys = re.compile(self.batch_by), []
        for i in ids:
            m = pattern.search(i)
            if m is None:
                raise ConfigError(f"batch_by {self.batch_by!r} does not match image id {i!r} "
                                  "— every id needs a match; fix the pattern")
            keys.append(m.group(1) if pattern.groups else m.group(0))
        return keys

    def trained_names(self, names: list[str]) -> list[str]:
        """The trainable weights GRPO updates under `train_only` (all of them when unset)."""
        if not self.train_only:
            return list(names)
        pattern = re.compile(self.train_only)
        picked = [n for n in names if pattern.search(n)]
        if not picked:
            example = f" (e.g. {names[0]!r})" if names else ""
            raise ConfigError(f"train_only {self.train_only!r} matches none of the "
                              f"{len(names)} trainable weights{example} — fix the pattern")
        return picked

    def validate(self) -> None:
        self.lora.validate()
        if not self.data:
            raise ConfigError("data is not set — pass --data LABELS (or data = ... in the TOML)")
        for name in ("iters", "batch_size", "num_iterations", "max_completion_length",
                     "max_rows", "loss_rows", "steps_per_report", "steps_per_save",
                     "keep_checkpoints", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_by", "train_only"):
            try:
                re.compile(getattr(self, name))
            except re.error as e:
                raise ConfigError(f"{name} {getattr(self, name)!r} is not a valid regex ({e}) — "
                                  "fix the pattern") from None
        if self.train_only and self.weight_decay:
            raise ConfigError("train_only with weight_decay > 0 would still decay the weights it "
                              "leaves out — set weight_decay = 0")
        if self.average_every < 0:
            raise ConfigError(f"average_every must be >= 0 (0 = off), got {self.average_every}")
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
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.reference not in ("initial", "base"):
            raise ConfigError(f"reference must be 'initial' or 'base', got {self.reference!r}")
        if self.beta < 0 or self.epsilon_low < 0 or self.epsilon_high < 0:
            raise ConfigError("beta, epsilon_low and epsilon_high must be >= 0")
        if self.quantize_base not in (None, 4, 8):
            raise ConfigError(f"quantize_base must be 4, 8 or unset, got {self.quantize_base}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"lr_schedule must be cosine or constant, got {self.lr_schedule!r}")

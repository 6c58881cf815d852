"""Typed training configs, filled from defaults < a TOML file < command-line flags.

`load_config` works for any dataclass (SFT here, GRPO in qponder_mlx.grpo): it walks the
dataclass fields, so a new option is one new field and both the TOML file and `--set` learn it.
Values are coerced to the field's annotated type (int, float, bool, str, Path, `X | None`,
`list[X]`, nested dataclasses); an unknown key or a value of the wrong type is one line naming the
key and where it came from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from qponder_mlx.io import atomic_write_json
from qponder_mlx.model import DEFAULT_MODEL

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

T = TypeVar("T")

CONFIG_FILE = "config.json"  # the resolved config inside a run folder

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message is one line."""


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / rank (mlx-vlm's convention)
    dropout: float = 0.0
    # Suffixes of the language model's linear layers (mlx-vlm resolves them to full names).
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    train_vision: bool = False  # also train the whole vision tower (full weights, not LoRA)
    # Also train the vision->language merger (the projector) in full, the rest of the tower
    # frozen: LLaVA-style projector training, for a base whose projector has not learned yet.
    train_merger: bool = False

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules is empty — name at least one linear layer")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class SFTConfig:
    model: str = DEFAULT_MODEL  # repo id or folder; float or already quantized
    data: str = ""  # JSONL in mlx-vlm chat format (what `qponder distill` writes)
    val_data: str | None = None  # same format; rows with "mos" also give SRCC/PLCC
    out: str = "runs/sft"
    iters: int = 1000  # optimizer steps
    batch_size: int = 4
    grad_accum: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-4
    min_learning_rate: float = 0.0  # where the cosine ends
    warmup: int | None = None  # linear warmup steps from 0; None = iters // 20, at most 50
    lr_schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantize_base: int | None = None  # 4 or 8: quantize a float base in memory (QLoRA)
    quantize_group_size: int = 64
    grad_checkpoint: bool = False  # recompute decoder layers in backward: less memory, slower
    # Run the tokens every row of a batch shares (system prompt + instruction, before the image)
    # once per batch instead of once per row: same loss and gradient up to float rounding,
    # fewer FLOPs (bench/sft_step_speed.py). False = every row in full, as before this option.
    share_prefix: bool = True
    # Keep the frozen vision tower's output of up to this many images in memory, so it runs once
    # per image, not once per step (0 = off; unused when the tower trains). Memory: tokens per
    # image x hidden x 2-4 bytes each (a 3B student at 448 px: ~1 MB per image).
    vision_cache: int = 4096
    max_seq_len: int = 2048  # longer rows (prompt + image + answer) are skipped
    # Share of rows also trained as a fast-mode answer, `<think></think><answer>X.XX</answer>`
    # (train/fast_answers.py), so fast mode's prompt is one the model learned; 0 = off.
    fast_share: float = 0.0
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 512 * 28 * 28
    seed: int = 0
    steps_per_report: int = 10
    steps_per_eval: int = 200
    steps_per_save: int = 100
    keep_checkpoints: int = 3
    val_samples: int = 32  # val rows used for loss and generation (0 = all)
    val_batch_size: int = 8
    val_max_tokens: int = 512  # token budget of a generated answer during validation
    max_bad_steps: int = 20  # consecutive NaN/inf steps before the run stops
    progress: bool = True

    def validate(self) -> None:
        self.lora.validate()
        check_common(self)
        for name in ("grad_accum", "steps_per_eval", "val_batch_size", "val_max_tokens",
                     "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.data:
            raise ConfigError("data is not set — pass --data FILE.jsonl (or data = ... in "
                              "the TOML file)")
        if self.vision_cache < 0:
            raise ConfigError(f"vision_cache must be >= 0 (0 = off), got {self.vision_cache}")
        if self.val_samples < 0:
            raise ConfigError(f"val_samples must be >= 0, got {self.val_samples}")
        if not 0 <= self.fast_share <= 1:
            raise ConfigError(f"fast_share must be in [0, 1], got {self.fast_share}")


def warmup_steps(cfg) -> int:
    """The warmup a config asks for; unset, 5 % of the run and at most 50 steps (a short run
    never waits longer than it lasts)."""
    return cfg.warmup if cfg.warmup is not None else min(50, cfg.iters // 20)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def check_common(cfg) -> None:
    """The checks SFT and GRPO configs share: counts, optimizer numbers, quantization, pixels.
    NaN, inf and out-of-range values fail here, before any model loads."""
    for name in ("iters", "batch_size", "steps_per_report", "steps_per_save",
                 "keep_checkpoints", "max_bad_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not (_finite(cfg.learning_rate) and cfg.learning_rate > 0):
        raise ConfigError(f"learning_rate must be a finite number > 0, got {cfg.learning_rate}")
    if not (_finite(cfg.min_learning_rate) and 0 <= cfg.min_learning_rate <= cfg.learning_rate):
        raise ConfigError(f"min_learning_rate must be in [0, learning_rate], got "
                          f"{cfg.min_learning_rate}")
    if not (_finite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ConfigError(f"weight_decay must be a finite number >= 0, got {cfg.weight_decay}")
    if cfg.grad_clip is not None and not (_finite(cfg.grad_clip) and cfg.grad_clip > 0):
        raise ConfigError(f"grad_clip must be a finite number > 0 (or unset), got "
                          f"{cfg.grad_clip}")
    if cfg.warmup is not None and not 0 <= cfg.warmup <= cfg.iters:
        raise ConfigError(f"warmup must be in [0, iters={cfg.iters}], got {cfg.warmup}")
    if cfg.lr_schedule not in ("cosine", "constant"):
        raise ConfigError(f"lr_schedule must be cosine or constant, got {cfg.lr_schedule!r}")
    if cfg.quantize_base not in (None, 4, 8):
        raise ConfigError(f"quantize_base must be 4, 8 or unset, got {cfg.quantize_base}")
    if cfg.quantize_group_size not in (32, 64, 128):
        raise ConfigError(f"quantize_group_size must be 32, 64 or 128, got "
                          f"{cfg.quantize_group_size}")
    if not 0 < cfg.min_pixels <= cfg.max_pixels:
        raise ConfigError(f"need 0 < min_pixels <= max_pixels, got {cfg.min_pixels}, "
                          f"{cfg.max_pixels}")


# ---------------------------------------------------------------- filling a dataclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """`value` (from TOML, JSON, a typed flag or a `--set` string) as type `tp`."""

    def bad(expected: str | None = None) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r} is not a valid "
                           f"{expected or _type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or isinstance(value, str) and value.lower() in ("none", "null"):
            if type(None) in args:
                return None
            raise bad()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                continue
        raise bad(" or ".join(_type_name(a) for a in args))
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    raise bad("list (JSON list or comma-separated)") from None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad("list")
        return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad(f"table ({_type_name(tp)})")
        return _fill(tp(), value, where, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise bad("bool (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise bad("string")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise bad("path")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: {key}: unsupported field type {_type_name(tp)}")


def _fill(obj: Any, values: Mapping[str, Any], where: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for k, v in values.items():
        if k not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{where}: unknown key '{prefix}{k}' — known keys here: {known}")
        tp = hints[k]
        if is_dataclass(tp) and isinstance(v, Mapping):
            setattr(obj, k, _fill(getattr(obj, k), v, where, prefix=f"{prefix}{k}."))
        else:
            setattr(obj, k, _coerce(v, tp, f"{prefix}{k}", where))
    return obj


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"lora.rank": 8, "iters": 3} -> {"lora": {"rank": 8}, "iters": 3}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"flags: '{key}' sets a field inside a non-table value")
        if isinstance(value, Mapping):
            node.setdefault(parts[-1], {}).update(value)
        else:
            node[parts[-1]] = value
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML (or JSON, e.g. a run folder's config.json) file as a dict; errors are one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file — check the path") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} "
                          f"({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a table of keys")
    return data


def load_config(cls: type[T], toml_path: Path | str | None = None,
                overrides: Mapping[str, Any] | None = None, *,
                base: Mapping[str, Any] | None = None) -> T:
    """Build `cls` from its defaults < `base` (e.g. a saved run config) < file < overrides.

    `overrides` may use dotted keys for nested fields ({"lora.rank": 8}) and string values
    (`--set key=value`); None values are ignored, so unset CLI flags keep the lower layers.
    """
    cfg = cls()
    if base:
        _fill(cfg, base, "saved run config")
    if toml_path is not None:
        _fill(cfg, read_config_file(Path(toml_path)), str(toml_path))
    if overrides:
        flat = {k: v for k, v in overrides.items() if v is not None}
        _fill(cfg, _nest(flat), "command line")
    return cfg


def config_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (Paths as strings)."""
    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, run_dir: Path | str) -> Path:
    """Write the resolved config to `run_dir/config.json` (atomic); returns the path."""
    path = Path(run_dir) / CONFIG_FILE
    atomic_write_json(path, config_dict(cfg))
    return path


def parse_set_flags(items: list[str] | None) -> dict[str, str]:
    """`--set key=value` strings -> {key: value}; values are coerced later by field type."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set lora.dropout=0.05")
        out[key.strip()] = value.strip()
    return out

"""`DistillConfig`: every setting of a distillation run, filled from a TOML file and CLI flags.

One flat dataclass, so a TOML file reads like the command line (`teacher_url = "..."` is
`--teacher-url ...`). `build_teacher` turns it into a backend; it is the only place that reads
the API key, from the environment variable the config names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from qponder_mlx.distill.openai_teacher import DEFAULT_MAX_PIXELS
from qponder_mlx.distill.retry import RetryPolicy
from qponder_mlx.distill.teacher_prompts import MODES
from qponder_mlx.distill.teachers import Teacher

TEACHERS = ("openai", "local")


@dataclass
class DistillConfig:
    teacher: str = "openai"  # openai | local
    teacher_url: str | None = None  # openai: base URL, e.g. http://127.0.0.1:8000/v1
    teacher_model: str | None = None  # openai: the server's model name; local: repo id/folder
    api_key_env: str | None = None  # NAME of the env var holding the key (never the key)
    adapter: str | None = None  # local: LoRA adapter folder
    mode: str = "blind"  # blind | guided
    max_score_error: float = 0.5  # keep iff |teacher score - MOS| <= this (1-5 scale)
    samples_per_image: int = 1  # k answers per image; the closest agreeing one is kept
    min_reasoning_words: int = 5  # a kept answer must reason, not just score
    concurrency: int = 8  # requests in flight
    temperature: float = 0.7
    max_tokens: int = 1024
    max_pixels: int = DEFAULT_MAX_PIXELS  # images are downscaled to at most this many pixels
    timeout_s: float = 120.0  # per request
    max_retries: int = 4  # per attempt, on timeouts, dropped connections, 429 and 5xx
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 120.0

    def validate(self) -> DistillConfig:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name}: {why} (got {getattr(self, name)!r})")

        if self.teacher not in TEACHERS:
            bad("teacher", f"must be one of {', '.join(TEACHERS)}")
        if self.mode not in MODES:
            bad("mode", f"must be one of {', '.join(MODES)}")
        if not self.max_score_error > 0:
            bad("max_score_error", "must be > 0")
        # `not x >= bound` (not `x < bound`) so that NaN is refused too.
        for name in ("samples_per_image", "concurrency", "max_tokens", "max_pixels"):
            if not getattr(self, name) >= 1:
                bad(name, "must be >= 1")
        for name in ("min_reasoning_words", "max_retries", "backoff_s", "max_backoff_s",
                     "max_retry_after_s", "temperature"):
            if not getattr(self, name) >= 0:
                bad(name, "must be >= 0")
        if not self.timeout_s < float("inf"):
            bad("timeout_s", "must be a finite number of seconds")
        if not self.timeout_s > 0:
            bad("timeout_s", "must be > 0")
        if self.teacher == "openai" and not self.teacher_url:
            bad("teacher_url", "the openai teacher needs --teacher-url (e.g. "
                "http://127.0.0.1:8000/v1)")
        if not self.teacher_model:
            bad("teacher_model", "pass --teacher-model: the model name the server serves "
                "(openai), or a repo id / folder (local)")
        return self

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(self.max_retries, self.backoff_s, self.max_backoff_s,
                           self.max_retry_after_s)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> DistillConfig:
        """Fields from a mapping (a TOML table); unknown keys and wrong types are errors."""
        known = {f.name: f for f in fields(cls)}
        defaults = cls()
        out: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"{source}: unknown key {key!r} (known: {', '.join(known)})")
            default = getattr(defaults, name)
            want = type(default) if default is not None else str
            ok = isinstance(value, want) or (want is float and isinstance(value, int))
            if isinstance(value, bool) or not ok:
                raise ValueError(f"{source}: {key} must be a {want.__name__}, got {value!r}")
            out[name] = float(value) if want is float else value
        return cls(**out)

    @classmethod
    def from_toml(cls, path: str | Path) -> DistillConfig:
        """Read `[distill]` (or the top level) of a TOML file."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise ValueError(f"{path}: reading TOML needs Python >= 3.11 — pass flags "
                             "instead") from None
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file — check --config") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e}) — fix the file") from None
        table = data.get("distill", data)
        if not isinstance(table, dict):
            raise ValueError(f"{path}: [distill] must be a table")
        return cls.from_mapping(table, str(path))


def read_api_key(env_name: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The key from the variable NAMED by --api-key-env; the message never shows a value."""
    if not env_name:
        return None
    environ = os.environ if environ is None else environ
    key = environ.get(env_name, "")
    if not key.strip():
        if not _ENV_NAME.fullmatch(env_name):
            # Most likely the key itself was pasted in: echoing it would put it in the terminal,
            # shell history and CI logs.
            raise ValueError("api_key_env: not set — and the value given does not look like an "
                             "environment variable NAME (not shown, in case it is the key); pass "
                             "a name such as OPENAI_API_KEY and export the key in it")
        raise ValueError(f"api_key_env: the environment variable {env_name} is not set or empty "
                         f"— export {env_name}=<your key> first")
    return key.strip()


# What we echo back as a variable name: the conventional upper-case form, at most 64 characters.
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")


def build_teacher(config: DistillConfig, environ: Mapping[str, str] | None = None) -> Teacher:
    """The backend `config.teacher` names, ready to `ask` (loads the model for `local`)."""
    config.validate()
    if config.teacher == "openai":
        from qponder_mlx.distill.openai_teacher import OpenAIConfig, OpenAITeacher

        oc = OpenAIConfig(url=config.teacher_url, model=config.teacher_model,
                          temperature=config.temperature, max_tokens=config.max_tokens,
                          max_pixels=config.max_pixels, timeout_s=config.timeout_s,
                          concurrency=config.concurrency)
        return OpenAITeacher(oc, api_key=read_api_key(config.api_key_env, environ))
    from qponder_mlx.distill.local_teacher import LocalTeacher  # imports MLX: only when used
    from qponder_mlx.generate import SamplingConfig
    from qponder_mlx.images import PixelPolicy

    pixels = PixelPolicy(min_pixels=min(128 * 28 * 28, config.max_pixels),
                         max_pixels=config.max_pixels)
    return LocalTeacher.load(config.teacher_model, config.adapter,
                             sampling=SamplingConfig(max_tokens=config.max_tokens,
                                                     temperature=config.temperature),
                             pixels=pixels)

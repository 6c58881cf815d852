"""Bounded retries with exponential back-off and jitter, honouring a server's Retry-After.

Back-off for retry i (0-based) is `min(max_backoff_s, backoff_s * 2**i)`, scaled by a random
factor in [0.5, 1] ("equal jitter"): N workers that failed together don't come back together,
and no wait is shorter than half the nominal one. When the server sends Retry-After we wait that
long (plus up to 10 %, again to spread the workers) — never less.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar

from qponder_mlx.distill.teachers import TeacherError, TransientTeacherError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 4  # so at most 5 calls per attempt
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 120.0  # a longer Retry-After ends the attempt instead of a stall

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("max_retries, backoff_s and max_backoff_s must be >= 0")

    def delay(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (0 = the first retry)."""
        if retry_after is not None:
            return retry_after * (1.0 + 0.1 * rng.random())
        nominal = min(self.max_backoff_s, self.backoff_s * 2.0**retry)
        return nominal * (0.5 + 0.5 * rng.random())


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP-date (RFC 9110 §10.2.3); None if absent
    or unreadable (the caller then backs off on its own schedule)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now_dt = datetime.fromtimestamp(time.time() if now is None else now, tz=timezone.utc)
    return max(0.0, (when - now_dt).total_seconds())


@dataclass
class RetryStats:
    retries: int = 0  # how many calls after the first one were made
    waited_s: float = 0.0


def call_with_retries(call: Callable[[], T], policy: RetryPolicy, *, rng: random.Random,
                      wait: Callable[[float], object] = time.sleep,
                      stats: RetryStats | None = None) -> T:
    """Run `call`, retrying `TransientTeacherError` up to `policy.max_retries` times.

    `wait(seconds)` sleeps between tries; pass `threading.Event().wait` so that a stopping run
    wakes its sleeping workers (a true return from it means "stop": the last error is raised).
    When the tries run out the last error is raised as a plain `TeacherError` saying so.
    """
    stats = stats if stats is not None else RetryStats()
    for retry in range(policy.max_retries + 1):
        try:
            return call()
        except TransientTeacherError as e:
            last = e
            if retry == policy.max_retries:
                break
            if e.retry_after is not None and e.retry_after > policy.max_retry_after_s:
                raise TeacherError(f"{e.reason}; server asked to wait {e.retry_after:.0f} s, more "
                                   f"than max_retry_after_s={policy.max_retry_after_s:g}",
                                   e.code) from None
            pause = policy.delay(retry, e.retry_after, rng)
            stats.waited_s += pause
            if wait(pause):  # Event.wait returns True when the run is stopping
                break
            stats.retries += 1
    tries = stats.retries + 1
    raise TeacherError(f"{last.reason} (gave up after {tries} tr{'y' if tries == 1 else 'ies'})",
                       last.code) from None

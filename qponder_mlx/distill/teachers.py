"""What a teacher is: one interface every backend implements, and the errors it may raise.

A backend is one file with a class that has `model`, `max_concurrency`, `prepare` and `ask`
(see `Teacher`); `run_distill` does the rest (retries, filtering, files, resume). The errors say
what the runner should do next:

* `TransientTeacherError`: worth retrying after a back-off (timeouts, dropped connections,
  HTTP 429 / 5xx); `retry_after` carries the server's Retry-After, in seconds.
* `TeacherError`: this call failed for good (HTTP 400, a reply that is not JSON); the sample's
  other attempts and every other sample go on.
* `FatalTeacherError`: no call can succeed (wrong key, wrong URL, unknown model): the run stops
  with the message, and the samples finished so far stay on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from qponder_mlx.distill.teacher_prompts import TeacherPrompt
from qponder_mlx.labels import Sample


@dataclass
class TeacherReply:
    text: str  # the answer as the teacher wrote it ("" when it said nothing)
    prompt_tokens: int = 0  # as the backend reports them; 0 when it doesn't
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | None (unknown)


# The code of a call that found nothing listening at the teacher's address (connection refused,
# connect timeout): when every sample of a run's start fails this way the run stops early.
UNREACHABLE = "unreachable"


class TeacherError(RuntimeError):
    """One call failed and retrying it would not help. `code` groups reasons in the summary."""

    def __init__(self, reason: str, code: str = "error"):
        super().__init__(reason)
        self.reason = reason
        self.code = code


class TransientTeacherError(TeacherError):
    """One call failed in a way that a later try may not (see module docstring)."""

    def __init__(self, reason: str, code: str = "transport", retry_after: float | None = None):
        super().__init__(reason, code)
        self.retry_after = retry_after


class FatalTeacherError(TeacherError):
    """The teacher cannot answer any call as configured; the run stops."""


class Teacher(Protocol):
    """A VLM that answers a prompt about an image.

    `prepare` runs once per sample (in a worker thread) and turns the sample's image into what
    `ask` needs (a data URL, a resized PIL image, ...); it raises `ImageError`/`OSError` for a
    bad image. `ask` runs once per attempt and must be safe to call from `max_concurrency`
    threads at once (None: no limit of its own).
    """

    model: str  # recorded in every row as teacher_model
    max_concurrency: int | None

    def prepare(self, sample: Sample) -> Any: ...

    def ask(self, image: Any, sample: Sample, prompt: TeacherPrompt) -> TeacherReply: ...

    def close(self) -> None: ...

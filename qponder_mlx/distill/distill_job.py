"""`run_distill`: ask the teacher about every sample, keep the answers that agree with humans.

Flow per sample (in one of `concurrency` worker threads): prepare the image once, make
`samples_per_image` attempts (each with bounded retries), judge every answer, pick the closest
agreeing one. The main thread is the only writer: it appends the sample's one row — kept rows to
`out`, rejected/failed rows to the sibling `*.rejected.jsonl` — flushed and fsynced, so a
kill -9 loses at most the samples in flight. A rerun reads both files, cuts a torn last line
and skips every id already there; nothing is asked twice or written twice.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qponder_mlx.distill.config import DistillConfig
from qponder_mlx.distill.retry import RetryStats, call_with_retries
from qponder_mlx.distill.summary import summarize
from qponder_mlx.distill.teacher_prompts import (
    TEACHER_PROMPT_VERSION,
    leaks_reference,
    teacher_prompt,
)
from qponder_mlx.distill.teachers import UNREACHABLE, FatalTeacherError, Teacher, TeacherError
from qponder_mlx.images import ImageError
from qponder_mlx.io import (
    append_jsonl,
    atomic_write_json,
    atomic_write_jsonl,
    read_jsonl,
    truncate_torn_tail,
)
from qponder_mlx.labels import Sample
from qponder_mlx.progress import progress_bar
from qponder_mlx.prompts import (
    PROMPT_VERSION,
    SYSTEM_PROMPT,
    USER_PROMPT,
    chat_messages,
    format_response,
    parse_response,
)
from qponder_mlx.safe_paths import OutputPathError, check_distinct, check_output

FORMAT_HINT = "<think>…</think><answer>X.XX</answer>"
TEXT_KEEP = 4000  # characters of a rejected answer kept for inspection
# A reply longer than this many characters per max_tokens token cannot be an answer of that
# budget (the longest tokens of Qwen2's BPE vocabulary are runs of ~16 characters); it is
# rejected, never kept as a training row.
TEXT_CHARS_PER_TOKEN = 16
# When this many samples in a row fail to connect before the teacher has answered anything in
# this run, the server is down (or the URL wrong): stop with one line instead of spending the
# whole back-off schedule on every sample. Those samples are not written, so the next run asks
# them again. A run whose teacher has answered once keeps the back-off (a later outage).
UNREACHABLE_STOP_AFTER = 4


class DistillError(ValueError):
    """The run cannot start or go on (mismatched resume, fatal teacher error); one line."""


def sibling(out: Path, tag: str, suffix: str = ".jsonl") -> Path:
    """distill.jsonl -> distill.<tag>.jsonl (the rejected file, the summary)."""
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{stem}.{tag}{suffix}")


@dataclass
class Attempt:
    index: int
    code: str | None = None  # None: agrees with the MOS; else why not (see `_judge`)
    reason: str | None = None
    answered: bool = False  # the teacher replied (possibly with garbage)
    text: str = ""
    score: float | None = None
    reasoning: str | None = None
    latency_s: float = 0.0  # of the call that answered (or of the last try)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    finish_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"attempt": self.index + 1, "code": self.code, "reason": self.reason,
                "score": self.score, "text": self.text[:TEXT_KEEP],
                "latency_s": round(self.latency_s, 3), "retries": self.retries,
                "finish_reason": self.finish_reason,
                "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens}}


@dataclass
class RunResult:
    out: Path
    rejected: Path
    summary_path: Path
    summary: dict
    skipped: int  # ids already finished by an earlier run
    new: Counter = field(default_factory=Counter)  # status -> rows written by this run


def _judge(a: Attempt, mos: float, cfg: DistillConfig) -> None:
    """Set `a.code`/`a.reason` for an answered attempt (None = keepable)."""
    p = parse_response(a.text[:TEXT_CHARS_PER_TOKEN * cfg.max_tokens + 1])
    a.score, a.reasoning = p.score, p.reasoning
    cut = " (reply cut at max_tokens)" if a.finish_reason == "length" else ""
    if len(a.text) > TEXT_CHARS_PER_TOKEN * cfg.max_tokens:
        a.code, a.reason = "too_long", (f"reply of {len(a.text):,} characters, more than "
                                        f"max_tokens={cfg.max_tokens} allows")
    elif not a.text.strip():
        a.code, a.reason = "empty", "empty reply" + cut
    elif not p.format_ok:
        a.code, a.reason = "bad_format", f"reply not in {FORMAT_HINT} form{cut}"
    elif len((p.reasoning or "").split()) < cfg.min_reasoning_words:
        a.code, a.reason = "no_reasoning", (f"reasoning has fewer than {cfg.min_reasoning_words} "
                                            "words")
    elif cfg.mode == "guided" and leaks_reference(p.reasoning):
        a.code, a.reason = "leak", "reasoning mentions the human rating it was shown"
    elif abs(p.score - mos) > cfg.max_score_error:
        a.code, a.reason = "score_error", (f"score {p.score:.2f} is {abs(p.score - mos):.2f} from "
                                           f"MOS {mos:.2f} (> {cfg.max_score_error:g})")


def _tokens(attempts: Sequence[Attempt]) -> dict[str, int]:
    return {"prompt": sum(a.prompt_tokens for a in attempts),
            "completion": sum(a.completion_tokens for a in attempts)}


def _row(sample: Sample, attempts: list[Attempt], cfg: DistillConfig, model: str) -> dict:
    """The one row this sample gets: kept (SFT-ready) or rejected/failed (with the reasons)."""
    common = {"id": sample.id, "mos": sample.mos, "teacher_model": model,
              "prompt_version": TEACHER_PROMPT_VERSION, "student_prompt_version": PROMPT_VERSION,
              "mode": cfg.mode, "attempts": len(attempts),
              "teacher_scores": [a.score for a in attempts if a.score is not None],
              "tokens_spent": _tokens(attempts)}
    agreeing = [a for a in attempts if a.answered and a.code is None]
    if agreeing:
        best = min(agreeing, key=lambda a: abs(a.score - sample.mos))  # first on ties
        answer = format_response(best.reasoning, best.score)
        return {"id": sample.id, "images": [str(sample.image)],  # mlx-vlm SFT keys first
                "messages": chat_messages(USER_PROMPT, SYSTEM_PROMPT, answer=answer),
                **common, "teacher_score": best.score,
                "score_error": round(best.score - sample.mos, 4),
                "latency_s": round(best.latency_s, 3), "tokens": _tokens([best])}
    answered = [a for a in attempts if a.answered]
    status = "rejected" if answered else "failed"
    first = (answered or attempts)[0]
    reason = "; ".join(f"attempt {a.index + 1}: {a.reason}" for a in attempts) \
        if len(attempts) > 1 else first.reason
    return {**common, "image": str(sample.image), "status": status, "code": first.code,
            "reason": reason, "attempt_details": [a.to_dict() for a in attempts]}


def _ask_once(teacher: Teacher, image: Any, sample: Sample, cfg: DistillConfig, index: int,
              rng: random.Random, stop: threading.Event) -> Attempt:
    prompt = teacher_prompt(cfg.mode, sample.mos)
    attempt = Attempt(index)
    stats = RetryStats()

    def call():
        t0 = time.perf_counter()
        try:
            return teacher.ask(image, sample, prompt)
        finally:
            attempt.latency_s = time.perf_counter() - t0

    try:
        reply = call_with_retries(call, cfg.retry, rng=rng, wait=stop.wait, stats=stats)
    except FatalTeacherError:
        raise
    except TeacherError as e:
        attempt.code, attempt.reason, attempt.retries = e.code, e.reason, stats.retries
        # An over-long reply is an answer (a bad one): the sample is rejected, not failed, and
        # --retry-failed does not ask for it again.
        attempt.answered = e.code == "too_long"
        return attempt
    except Exception as e:  # noqa: BLE001 — a backend bug on one sample must not end the run
        attempt.code, attempt.reason = "error", f"teacher raised {type(e).__name__}: {e}"
        return attempt
    attempt.answered, attempt.retries = True, stats.retries
    attempt.text, attempt.finish_reason = reply.text, reply.finish_reason
    attempt.prompt_tokens, attempt.completion_tokens = reply.prompt_tokens, reply.completion_tokens
    _judge(attempt, sample.mos, cfg)
    return attempt


def distill_sample(teacher: Teacher, sample: Sample, cfg: DistillConfig,
                   rng: random.Random | None = None,
                   stop: threading.Event | None = None) -> dict | None:
    """All attempts for one sample -> its row; None if the run stopped meanwhile."""
    rng = rng or random.Random()
    stop = stop or threading.Event()
    try:
        image = teacher.prepare(sample)
    except (ImageError, OSError) as e:
        msg = f"{sample.image}: {e.strerror or e}" if isinstance(e, OSError) else str(e)
        return _row(sample, [Attempt(0, "image", msg)], cfg, teacher.model)
    except Exception as e:  # noqa: BLE001 — as in `_ask_once`: one sample, not the run
        msg = f"{sample.image}: preparing the image raised {type(e).__name__}: {e}"
        return _row(sample, [Attempt(0, "error", msg)], cfg, teacher.model)
    attempts = []
    for i in range(cfg.samples_per_image):
        if stop.is_set():
            return None
        attempts.append(_ask_once(teacher, image, sample, cfg, i, rng, stop))
    # A stopping run may have cut the last attempt short; its row would be wrong, and the main
    # thread no longer writes anyway.
    return None if stop.is_set() else _row(sample, attempts, cfg, teacher.model)


def _check_resume(path: Path, teacher_model: str, cfg: DistillConfig) -> set[str]:
    """Ids already in `path`; refuses a file written with another teacher, mode or prompt."""
    ids: set[str] = set()
    for row in read_jsonl(path):
        if not ids:
            mine = (teacher_model, cfg.mode, TEACHER_PROMPT_VERSION)
            theirs = (row.get("teacher_model"), row.get("mode"), row.get("prompt_version"))
            if theirs != mine:
                raise DistillError(
                    f"{path}: written by teacher {theirs[0]!r}, mode {theirs[1]!r}, prompt "
                    f"{theirs[2]!r}, not {mine[0]!r}, {mine[1]!r}, {mine[2]!r} — use a new --out "
                    "or the same settings to resume")
        ids.add(str(row["id"]))
    return ids


def check_outputs(out: str | Path, samples: Sequence[Sample]) -> None:
    """Raise DistillError unless `out` and its siblings are new or distill files of ours and
    none is an input image; `run_distill` calls it first, a CLI may call it before loading."""
    out = Path(out)
    _check_outputs(out, sibling(out, "rejected"), sibling(out, "summary", ".json"), samples)


def _check_outputs(out: Path, rejected: Path, summary_path: Path,
                   samples: Sequence[Sample]) -> None:
    # Before anything is cut or appended: a torn-tail cut on a photo would destroy it.
    images = [s.image for s in samples]
    try:
        check_distinct({"--out": out, "the rejected file": rejected,
                        "the summary file": summary_path})
        for name, path, kind in (("--out", out, "distill_rows"),
                                 ("the rejected file", rejected, "distill_rows"),
                                 ("the summary file", summary_path, "distill_summary")):
            check_output(name, path, kind, inputs=images)
    except OutputPathError as e:
        raise DistillError(str(e)) from None


def _drop_failed(path: Path) -> int:
    """Remove failed rows (so they are asked again); atomic, so a crash keeps the old file."""
    rows = list(read_jsonl(path))
    keep = [r for r in rows if r.get("status") != "failed"]
    if len(keep) != len(rows):
        atomic_write_jsonl(path, keep)
    return len(rows) - len(keep)


class _UnreachableGuard:
    """Holds back the rows of a run's first samples while each failed only to connect; after
    `limit` of them the teacher is `down`. Any other row (an answer, an HTTP error) shows a
    reachable server: the held rows are released and the guard retires."""

    def __init__(self, limit: int):
        self.limit, self.held, self.active, self.down = limit, [], limit > 0, False
        self.first_reason = ""

    def check(self, row: dict) -> list[dict]:
        """The rows to write now."""
        if not self.active:
            return [row]
        if row.get("status") == "failed" and row.get("code") == UNREACHABLE:
            self.held.append(row)
            self.first_reason = self.first_reason or str(row.get("reason", ""))
            self.down = len(self.held) >= self.limit
            return []
        self.active = False
        held, self.held = self.held, []
        return [*held, row]


def run_distill(samples: Sequence[Sample], teacher: Teacher, cfg: DistillConfig,
                out: str | Path, *, retry_failed: bool = False, progress: bool = True,
                seed: int | None = None) -> RunResult:
    """Distill `samples` into `out` (kept) and its `.rejected.jsonl` sibling; resumable.

    Returns the counts of this run and the summary of both files (all runs together), which is
    also written to `<out>.summary.json`. Raises DistillError for a resume with other settings
    or a fatal teacher error (finished samples stay written).
    """
    cfg.validate()
    out = Path(out)
    rejected, summary_path = sibling(out, "rejected"), sibling(out, "summary", ".json")
    _check_outputs(out, rejected, summary_path, samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    for p in (out, rejected):
        truncate_torn_tail(p)  # a kill -9 mid-append leaves half a line; never glue onto it
    if retry_failed:
        _drop_failed(rejected)
    dup = [i for i, n in Counter(s.id for s in samples).items() if n > 1]
    if dup:
        raise DistillError(f"sample id {dup[0]!r} appears more than once — ids must be unique "
                           "(they are what a resumed run skips)")
    done = _check_resume(out, teacher.model, cfg) | _check_resume(rejected, teacher.model, cfg)
    todo = [s for s in samples if s.id not in done]
    result = RunResult(out, rejected, summary_path, {}, skipped=len(samples) - len(todo))

    workers = min(cfg.concurrency, teacher.max_concurrency or cfg.concurrency, max(1, len(todo)))
    unreachable = _UnreachableGuard(min(UNREACHABLE_STOP_AFTER, len(todo)))
    rng, stop = random.Random(seed), threading.Event()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="distill")
    queue = iter(todo)
    inflight: set[Future] = set()

    def write(rows: list[dict]) -> None:
        for row in rows:
            status = row.get("status", "kept")
            append_jsonl(out if status == "kept" else rejected, row)
            result.new[status] += 1

    try:
        with progress_bar(len(todo), f"distill ({cfg.mode}, {teacher.model})",
                          enabled=progress) as advance:
            while True:
                # Keep exactly `workers` samples in flight: submitting everything up front would
                # hold a future per sample and let a fatal error waste a whole queue.
                while len(inflight) < workers and (s := next(queue, None)) is not None:
                    inflight.add(pool.submit(distill_sample, teacher, s, cfg, rng, stop))
                if not inflight:
                    break
                finished, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in finished:
                    row = fut.result()  # re-raises FatalTeacherError
                    if row is None:
                        continue
                    write(unreachable.check(row))
                    if unreachable.down:
                        where = getattr(teacher, "shown_endpoint", None) or teacher.model
                        raise DistillError(
                            f"teacher at {where} is not reachable — is the server running? "
                            f"Last error: {unreachable.first_reason}. No sample was marked "
                            "failed; rerun the same command once it is up")
                    advance(kept=result.new["kept"], rejected=result.new["rejected"],
                            failed=result.new["failed"])
            write(unreachable.held)  # a run that ended (or stopped) before the guard decided
    except FatalTeacherError as e:
        raise DistillError(e.reason) from None
    finally:
        stop.set()  # wakes workers sleeping in a back-off; queued samples are dropped
        pool.shutdown(wait=False, cancel_futures=True)
    result.summary = summarize(out, rejected)
    atomic_write_json(summary_path, result.summary)
    return result

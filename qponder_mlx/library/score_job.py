"""Score a photo library into the store: hash, skip what is done, batch the rest, commit per batch.

The job in four steps:

1. hash every file (sha256 of its bytes; a file whose size and mtime are unchanged since the last
   run reuses its stored hash, so reruns read nothing);
2. skip content the store already scored with this scorer identity (a moved or renamed file is a
   hash hit: its stored path is updated, nothing is rescored); a file that cannot be read becomes
   an error row at once;
3. plan batches of images that the pixel policy resizes to the same size (read from the file
   header), so each batch runs as one model call with no padding;
4. score batch by batch (reading, hashing and decoding run in threads up to two batches ahead
   of the model; `read_ahead`); each file is read once more and its result is stored under the
   hash of the very bytes decoded (a file rewritten after step 1 is stored as its new content,
   a file removed meanwhile becomes a retried read error, never the old content's result); each
   batch's rows are one transaction, so a crash or Ctrl-C loses at most the batch in flight,
   and a rerun picks up exactly where the last commit left off.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from qponder_mlx.images import ImageError, PixelPolicy, ensure_heif_support, load_for_model
from qponder_mlx.io import file_sha256, read_regular
from qponder_mlx.library.store import UNREADABLE_PREFIX, FileState, ResultStore
from qponder_mlx.progress import progress_bar

if TYPE_CHECKING:
    from qponder_mlx.scoring import Scorer, ScoreResult

# How many freshly hashed files to commit at once during step 1 (a kill there loses hashes only).
HASH_COMMIT_EVERY = 256

# Step 4's reading, hashing and decoding run in threads ahead of the model: Pillow's decoders and
# resamplers and hashlib release the GIL, so threads overlap each other and the model (MLX
# releases it while it evaluates), images reach the model without being pickled, and a failure
# stays an exception of this process. Measured on 2 idle cores (bench/library_speed.py), 12-MP
# JPEGs reduced-decoded for a 112 px policy: 2 threads 177-178 photos/s, 2 processes 170-177,
# serial 92 (two runs);
# the whole job on the tiny model with 1, 2, 3 readers: 70, 94, 103 photos/s (reading and hashing
# wait on the disk too, so one reader more than cores still pays); at the default policy, where
# the model sets the pace, 2.9 photos/s with any of them.
DECODE_WORKERS = min(4, (os.cpu_count() or 1) + 1)
# Batches read ahead of the one the model runs: memory holds at most (this + 1) batches of
# model-sized images plus one full-size decode per worker, however large the library.
READ_AHEAD_BATCHES = 2


@dataclass
class RunSummary:
    """What happened to every file of a run; the counts partition `files`."""

    files: int = 0
    scored: int = 0  # scored in this run, with a score
    cached: int = 0  # skipped: the store already had a score for this content and scorer
    moved: int = 0  # cached files found at a new path (the stored path was updated)
    no_score: int = 0  # answered, but the answer held no valid score (reason mode)
    errors: Counter = field(default_factory=Counter)  # reason -> files that could not be scored
    pending: int = 0  # not reached: the run was interrupted
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())

    def lines(self) -> list[str]:
        parts = [f"{self.scored} scored", f"{self.cached} cached (skipped)"]
        if self.no_score:
            parts.append(f"{self.no_score} answered without a valid score")
        parts.append(f"{self.n_errors} errors")
        if self.pending:
            parts.append(f"{self.pending} not reached")
        out = [f"{self.files} files: " + ", ".join(parts) + f" in {self.seconds:.1f}s"]
        if self.moved:
            out.append(f"{self.moved} moved or renamed files kept their stored score")
        if self.errors:
            out.append("errors: " + ", ".join(f"{reason} {n}"
                                              for reason, n in self.errors.most_common()))
        return out


# Short names for the one-line messages of qponder_mlx.images and the scorer, for the summary.
_REASONS = (
    ("empty file", "empty file"),
    ("permission denied", "permission denied"),
    ("decompression", "too many pixels (decompression bomb)"),
    ("not an image", "not an image"),
    ("truncated or corrupt", "truncated or corrupt"),
    ("aspect ratio", "extreme aspect ratio"),
    ("no such file", "file vanished"),
    ("not a regular file", "not a regular file"),
    ("model failed", "model failed"),
)


def error_reason(message: str) -> str:
    """A short, countable reason for an error message ("truncated or corrupt", ...)."""
    low = message.lower()
    for needle, reason in _REASONS:
        if needle in low:
            return reason
    core = message.split(" — ")[0]
    core = core.rsplit(": ", 1)[-1]
    return re.sub(r"\s*\(.*?\)", "", core).strip() or "other"


class StopFlag:
    """Set (by Ctrl-C, a signal, another thread) to end the run after the current batch."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


@contextmanager
def stop_on_sigint(flag: StopFlag) -> Iterator[StopFlag]:
    """First Ctrl-C sets `flag` (finish the batch, commit, stop); a second one aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag:
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _strip_path(message: str, path: str) -> str:
    # The path has its own column; the stored reason stays true when the file moves.
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _hash_files(store: ResultStore, paths: Sequence[Path], stop: StopFlag, progress: bool
                ) -> tuple[dict[str, str], dict[str, str]]:
    """path -> sha256 for readable files; path -> error message for unreadable ones."""
    known = store.file_states()
    hashes: dict[str, str] = {}
    unreadable: dict[str, str] = {}
    fresh: list[tuple[str, FileState]] = []

    def flush() -> None:
        if fresh:
            with store.transaction():
                store.put_files(fresh)
            fresh.clear()

    with progress_bar(len(paths), "hashing", unit="file", enabled=progress) as advance:
        for p in paths:
            if stop:
                break  # files not hashed yet count as "not reached"
            key = str(p)
            try:
                st = os.stat(p)
                old = known.get(key)
                if (old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns
                        and not old.sha256.startswith(UNREADABLE_PREFIX)):
                    hashes[key] = old.sha256
                else:
                    hashes[key] = file_sha256(p)
                    fresh.append((key, FileState(hashes[key], st.st_size, st.st_mtime_ns)))
            except OSError as e:
                why = "permission denied" if isinstance(e, PermissionError) else (
                    f"cannot read file ({e.strerror or e})")
                hint = "fix the file permissions" if isinstance(e, PermissionError) else (
                    "check the file")
                unreadable[key] = f"{key}: {why} — {hint}"
                fresh.append((key, FileState(UNREADABLE_PREFIX + key, -1, -1)))
            if len(fresh) >= HASH_COMMIT_EVERY:
                flush()
            advance()
    flush()
    return hashes, unreadable


def model_size(path: str, policy: PixelPolicy) -> tuple[int, int] | None:
    """The size the model will see, from the file header only (no decode); None if unknown."""
    ensure_heif_support()
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
        if orientation in (5, 6, 7, 8):  # EXIF rotations by 90 degrees swap the sides
            w, h = h, w
        return policy.target_size((w, h))
    except Exception:  # noqa: BLE001 — only a batching hint; the scorer reports the real error
        return None


def plan_batches(paths: Sequence[str], policy: PixelPolicy, batch_size: int) -> list[list[str]]:
    """Batches of paths with one model size each, in order of their first path."""
    groups: dict[tuple[int, int] | None, list[str]] = {}
    for p in paths:
        groups.setdefault(model_size(p, policy), []).append(p)
    batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    order = {p: i for i, p in enumerate(paths)}
    return sorted(batches, key=lambda b: order[b[0]])


def _result_row(scorer: Scorer, sha: str, path: str, r: ScoreResult) -> dict:
    loaded, cfg = scorer.loaded, scorer.config
    error = _strip_path(r.error, path) if r.error else None
    kind = None
    if error is not None:
        kind = "model" if error.startswith("model failed") else "image"
    return {
        "sha256": sha, "identity": scorer.identity, "path": path, "score": r.score,
        "reasoning": r.reasoning, "text": r.text or None, "format_ok": int(bool(r.format_ok)),
        "error": error, "error_kind": kind, "mode": cfg.mode, "model": loaded.source,
        "adapter": str(loaded.adapter) if loaded.adapter else None, "weights": loaded.identity,
        "prompt_version": cfg.prompt_version, "seconds": round(r.seconds, 4), "tokens": r.tokens,
        "scored_at": time.time(),
    }


def score_library(scorer: Scorer, files: Sequence[str | os.PathLike], store: ResultStore, *,
                  stop: StopFlag | None = None, progress: bool = True,
                  decode_workers: int | None = None) -> RunSummary:
    """Score `files` (from `discover`) into `store`; see the module docstring for the steps.

    `decode_workers`: threads that read, hash and decode the next batches while the model runs
    the current one (default `DECODE_WORKERS`; 0 reads each batch in this thread when its turn
    comes). Results, their order and the store's writes are the same either way.
    """
    t0 = time.perf_counter()
    stop = stop if stop is not None else StopFlag()
    paths = [Path(os.path.abspath(f)) for f in files]
    summary = RunSummary(files=len(paths))
    hashes, unreadable = _hash_files(store, paths, stop, progress)
    status, todo = _reconcile(scorer, store, hashes, unreadable, summary)

    # Steps 3-4: plan same-size batches; score and commit one batch at a time.
    hashes = dict(hashes)  # a file rewritten or removed before its batch moves to its new key
    sha_of = {p: s for s, p in todo.items()}
    batches = plan_batches(list(todo.values()), scorer.config.pixels, scorer.config.batch_size)
    n_err = sum(1 for s in status.values() if s.startswith("error:"))
    summary.interrupted = bool(stop)
    workers = DECODE_WORKERS if decode_workers is None else decode_workers
    with progress_bar(len(todo), f"scoring ({scorer.config.mode})", enabled=progress) as advance, \
            read_ahead(batches, scorer.config.pixels, workers) as reads:
        for batch in batches:
            if stop:
                summary.interrupted = True
                break
            rows, files = _score_batch(scorer, batch, next(reads), sha_of, hashes)
            with store.transaction():
                store.put_results(rows)
                store.put_files(files)
            for row in rows:
                if row["error"]:
                    status[row["sha256"]] = "error:" + error_reason(row["error"])
                    n_err += 1
                else:
                    status[row["sha256"]] = "scored" if row["score"] is not None else "no_score"
            advance(len(batch), errors=n_err)

    _tally(summary, paths, hashes, status)
    summary.seconds = time.perf_counter() - t0
    return summary


@dataclass
class _Read:
    """One file read for scoring: the hash of the bytes read, and their image or error."""

    sha256: str | None = None  # None: the file could not be read (error is then a read error)
    state: FileState | None = None
    image: Image.Image | None = None
    error: str | None = None


def _read_for_scoring(path: str, policy: PixelPolicy) -> _Read:
    """Read the file once; hash and decode those same bytes, resized to the model's grid.

    The hash from step 1 may be stale by now (the file rewritten or removed since): a result is
    only ever stored under the hash of the bytes that produced it, and a read failure is never
    stored under a content hash at all (it is a retried "read" error of the path).
    """
    try:
        data, st = read_regular(path)
    except OSError as e:
        why = "permission denied" if isinstance(e, PermissionError) else (
            "no such file" if isinstance(e, FileNotFoundError) else
            f"cannot read file ({e.strerror or e})")
        return _Read(error=f"{path}: {why} — check the file and rerun to retry it")
    sha = hashlib.sha256(data).hexdigest()
    r = _Read(sha, FileState(sha, st.st_size, st.st_mtime_ns))
    try:
        # Resized here, one photo at a time: a batch holds model-sized images, never 8 decoded
        # full-resolution ones (and JPEG/HEIC decode reduced: images.load_for_model).
        r.image = load_for_model(data, path, policy)
        r.image.info["path"] = path  # for whoever inspects a batch (tests, debugging)
    except ImageError as e:
        r.error = str(e)
    return r


@contextmanager
def read_ahead(batches: Sequence[Sequence[str]], policy: PixelPolicy, workers: int,
               ahead: int = READ_AHEAD_BATCHES) -> Iterator[Iterator[list[_Read]]]:
    """Each batch's reads, in batch order, with up to `ahead` later batches read meanwhile by
    `workers` threads (0: each batch read in the caller's thread when asked for). Leaving the
    block cancels reads not started and waits for the ones running."""
    if workers <= 0:
        yield ([_read_for_scoring(p, policy) for p in b] for b in batches)
        return
    ensure_heif_support()  # registered once here, not raced by the workers
    pool = ThreadPoolExecutor(workers, thread_name_prefix="qponder-read")
    queued: deque[list[Future[_Read]]] = deque()
    rest = iter(batches)

    def reads() -> Iterator[list[_Read]]:
        while True:
            while len(queued) <= ahead and (b := next(rest, None)) is not None:
                queued.append([pool.submit(_read_for_scoring, p, policy) for p in b])
            if not queued:
                return
            yield [f.result() for f in queued.popleft()]

    try:
        yield reads()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _score_batch(scorer: Scorer, batch: Sequence[str], reads: Sequence[_Read],
                 sha_of: dict[str, str], hashes: dict[str, str]
                 ) -> tuple[list[dict], list[tuple[str, FileState]]]:
    """Result rows for one batch, and the files whose content changed since it was hashed."""
    from qponder_mlx.scoring import ScoreResult

    images = [r.image for r in reads if r.image is not None]
    answers = iter(scorer.score(images) if images else [])
    rows: list[dict] = []
    files: list[tuple[str, FileState]] = []
    for path, r in zip(batch, reads):
        if r.sha256 is None:  # gone or unreadable since step 1
            key = UNREADABLE_PREFIX + path
            rows.append({**_result_row(scorer, key, path, ScoreResult(key=path, error=r.error)),
                         "error_kind": "read"})
            files.append((path, FileState(key, -1, -1)))  # rehashed on the next run
            hashes.pop(path, None)
            continue
        answer = next(answers) if r.image is not None else ScoreResult(key=path, error=r.error)
        rows.append(_result_row(scorer, r.sha256, path, answer))
        if r.sha256 != sha_of[path]:  # rewritten since step 1: the new bytes were scored
            files.append((path, r.state))
            hashes[path] = r.sha256
    return rows, files


def _reconcile(scorer: Scorer, store: ResultStore, hashes: dict[str, str],
               unreadable: dict[str, str], summary: RunSummary
               ) -> tuple[dict[str, str], dict[str, str]]:
    """Step 2: mark what is done, follow moves, store read errors; return (status, todo).

    status: content key -> "cached" | "cached_no_score" | "error:<reason>" (later also "scored",
    "no_score"); todo: sha256 -> the path to score it from (the first copy of a duplicate).
    """
    from qponder_mlx.scoring import ScoreResult

    identity = scorer.identity
    finished = store.finished(identity)
    status: dict[str, str] = {}
    todo: dict[str, str] = {}
    gone: list[str] = []
    with store.transaction():
        for path, sha in hashes.items():
            if sha in finished:
                status[sha] = "cached"
                old = finished[sha]
                if old != path:  # a hash hit at a new path: keep the score, follow the file
                    store.set_result_path(sha, identity, path)
                    finished[sha] = path
                    if not os.path.exists(old):
                        summary.moved += 1
                        gone.append(old)
            else:
                todo.setdefault(sha, path)
            # A file that was unreadable before and is readable now: its old error is stale.
            store.drop_results(UNREADABLE_PREFIX + path)
        store.forget_files(gone)
        store.put_results([
            {**_result_row(scorer, UNREADABLE_PREFIX + p, p, ScoreResult(key=p, error=msg)),
             "error_kind": "read"} for p, msg in unreadable.items()])
    for p, msg in unreadable.items():
        status[UNREADABLE_PREFIX + p] = "error:" + error_reason(msg)
    # Cached error rows still count as errors (with their reason) in the summary.
    cached = [p for p, s in hashes.items() if status.get(s) == "cached"]
    for r in store.rows(identity, cached):
        if r["error"]:
            status[r["sha256"]] = "error:" + error_reason(r["error"])
        elif r["score"] is None:
            status[r["sha256"]] = "cached_no_score"
    return status, todo


def _tally(summary: RunSummary, paths: Sequence[Path], hashes: dict[str, str],
           status: dict[str, str]) -> None:
    """Count every path once, by the status of its content."""
    for path in map(str, paths):
        s = status.get(hashes.get(path, UNREADABLE_PREFIX + path))
        if s is None:
            summary.pending += 1
        elif s in ("cached", "cached_no_score"):
            summary.cached += 1
        elif s == "scored":
            summary.scored += 1
        elif s == "no_score":
            summary.no_score += 1
        else:
            summary.errors[s.removeprefix("error:")] += 1

"""Files that are never half-written: atomic replaces and flushed append-only JSONL."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open a regular file for reading; anything else raises OSError before a byte is read.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer, and the
    fstat of the opened descriptor (not of the name) is what decides: a FIFO, a device
    (`/dev/zero` never ends) or a socket behind a link is refused, and a file swapped after a
    check cannot slip in. On a regular file O_NONBLOCK changes nothing.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"not a regular file ({file_kind(mode)})",
                          os.fspath(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file and the stat of the descriptor they were read from."""
    with open_regular(path) as f:
        st = os.fstat(f.fileno())
        return f.read(), st


def file_kind(mode: int) -> str:
    """What a stat mode names, for messages: "FIFO", "character device", ..."""
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISDIR, "folder"), (stat.S_ISREG, "regular file")):
        if test(mode):
            return name
    return "special file"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps at most 40 characters of the final one: a name near the file
    # system's 255-byte limit must still leave room for the random part and ".tmp".
    stem = path.name[:40]
    while len(os.fsencode(stem)) > 40:
        stem = stem[:-1]
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 & ~umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write `rows` as a whole JSONL file (one JSON object per line, as `append_jsonl` writes
    them); atomic, so a crash keeps the old file."""
    atomic_write_text(path, "".join(_jsonl_line(r) for r in rows))


def _jsonl_line(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, default=str) + "\n"


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line and flush it to disk, so a kill -9 loses at most the line in flight."""
    line = _jsonl_line(row)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Rows of a JSONL file; a torn last line (from a crash mid-write) is skipped."""
    p = Path(path)
    if not p.exists():
        return
    with p.open(encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                continue  # the write in flight when the process died
            raise ValueError(f"{p} line {i + 1}: not valid JSON — fix or delete the line") from None


def truncate_torn_tail(path: str | Path) -> bool:
    """Cut a last line that has no newline (a write killed mid-way) before appending again.

    Returns True if something was cut. Without this, the next append would glue a new row onto
    the torn one and corrupt both.
    """
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return False
    with p.open("rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return False
        f.truncate(data.rfind(b"\n") + 1)
        return True


def file_sha256(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    """sha256 of a regular file's bytes, read in chunks; a FIFO or device raises OSError
    instead of hanging."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()

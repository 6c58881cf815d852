"""The results store: one SQLite file (WAL) that every export is a view of.

Two tables do the work:

* `files`  path -> sha256 of its bytes, with the size and mtime it had when hashed, so a rerun
  over 20,000 unchanged photos re-reads none of them;
* `results` (sha256, scorer identity) -> score, reasoning, raw answer, error, timings. Keying by
  content, not path, is what lets a moved or renamed photo keep its score, and what makes a
  rerun after a crash skip exactly the rows that were committed.

Every batch of results is one transaction (synchronous=FULL), so a kill -9 at any point leaves
either the whole batch or none of it, and the primary key makes a duplicate impossible.

A file that cannot even be read gets the key `unreadable:<path>` instead of a hash, so it still
has an error row; it is retried on every run.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    seen_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_sha256 ON files (sha256);
CREATE TABLE IF NOT EXISTS results (
    sha256 TEXT NOT NULL,
    identity TEXT NOT NULL,
    path TEXT NOT NULL,
    score REAL,
    reasoning TEXT,
    text TEXT,
    format_ok INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    error_kind TEXT,
    mode TEXT NOT NULL,
    model TEXT NOT NULL,
    adapter TEXT,
    weights TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    seconds REAL,
    tokens INTEGER,
    scored_at REAL NOT NULL,
    PRIMARY KEY (sha256, identity)
);
CREATE TABLE IF NOT EXISTS thumbs (
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    jpeg BLOB,
    PRIMARY KEY (sha256, size)
);
"""

# error_kind: "image" errors belong to the bytes (truncated, not an image...) and stay cached for
# that content; "read" (file access) and "model" (a failed batch) may pass, so they are retried.
RETRIED_ERROR_KINDS = ("read", "model")
UNREADABLE_PREFIX = "unreadable:"

RESULT_COLUMNS = ("sha256", "identity", "path", "score", "reasoning", "text", "format_ok",
                  "error", "error_kind", "mode", "model", "adapter", "weights", "prompt_version",
                  "seconds", "tokens", "scored_at")


class StoreError(RuntimeError):
    """The results database cannot be used; one line naming the file and the fix."""


@dataclass(frozen=True)
class FileState:
    sha256: str
    size: int
    mtime_ns: int


def file_sha256(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


class ResultStore:
    """A results database; open it with `ResultStore(path)` or `with ResultStore(path) as s:`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are explicit (`transaction()`), one per batch.
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        except (sqlite3.OperationalError, OSError) as e:  # no such folder, read-only, locked
            raise StoreError(f"{self.path}: cannot open the results database ({e}) — check the "
                             "folder exists and is writable") from None
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a qponder results database ({e}) — pass a new "
                             "--db path") from None
        if row is None:
            self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: results schema {row[0]}, this qponder reads "
                             f"{SCHEMA_VERSION} — use a new --db path or a matching qponder")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing: a crash or an exception inside leaves the store as it was."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------ files: path -> content

    def file_states(self) -> dict[str, FileState]:
        rows = self.db.execute("SELECT path, sha256, size, mtime_ns FROM files")
        return {r["path"]: FileState(r["sha256"], r["size"], r["mtime_ns"]) for r in rows}

    def put_files(self, rows: Iterable[tuple[str, FileState]]) -> None:
        """Record what each path holds now (call inside a transaction)."""
        now = time.time()
        self.db.executemany(
            "INSERT INTO files (path, sha256, size, mtime_ns, seen_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET sha256=excluded.sha256, size=excluded.size, "
            "mtime_ns=excluded.mtime_ns, seen_at=excluded.seen_at",
            [(p, s.sha256, s.size, s.mtime_ns, now) for p, s in rows])

    def forget_files(self, paths: Iterable[str]) -> None:
        self.db.executemany("DELETE FROM files WHERE path=?", [(p,) for p in paths])

    def paths_of(self, sha256: str) -> list[str]:
        rows = self.db.execute("SELECT path FROM files WHERE sha256=? ORDER BY path", (sha256,))
        return [r[0] for r in rows]

    # ------------------------------------------------------------------ results

    def finished(self, identity: str) -> dict[str, str]:
        """sha256 -> stored path of every result that a rerun must not redo for `identity`."""
        marks = ",".join("?" * len(RETRIED_ERROR_KINDS))
        rows = self.db.execute(
            f"SELECT sha256, path FROM results WHERE identity=? AND "
            f"(error_kind IS NULL OR error_kind NOT IN ({marks}))",
            (identity, *RETRIED_ERROR_KINDS))
        return {r[0]: r[1] for r in rows}

    def put_results(self, rows: Sequence[dict]) -> None:
        """Insert or replace result rows (call inside a transaction)."""
        cols = ", ".join(RESULT_COLUMNS)
        marks = ", ".join("?" * len(RESULT_COLUMNS))
        self.db.executemany(f"INSERT OR REPLACE INTO results ({cols}) VALUES ({marks})",
                            [tuple(r.get(c) for c in RESULT_COLUMNS) for r in rows])

    def set_result_path(self, sha256: str, identity: str, path: str) -> None:
        self.db.execute("UPDATE results SET path=? WHERE sha256=? AND identity=?",
                        (path, sha256, identity))

    def drop_results(self, sha256: str) -> None:
        self.db.execute("DELETE FROM results WHERE sha256=?", (sha256,))

    def result_count(self, identity: str | None = None) -> int:
        if identity is None:
            return self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM results WHERE identity=?",
                               (identity,)).fetchone()[0]

    def rows(self, identity: str, paths: Iterable[str] | None = None) -> list[dict]:
        """One row per file path with a stored result for `identity`, sorted by path.

        `paths` limits the view to those files (e.g. one run's); None gives every file the store
        knows. Two copies of one photo are two rows sharing one result.
        """
        select = ("SELECT f.path AS file_path, r.* FROM files f JOIN results r "
                  "ON r.sha256 = f.sha256 AND r.identity = ?")
        if paths is None:
            cur = self.db.execute(select + " ORDER BY f.path", (identity,))
        else:
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (path TEXT PRIMARY KEY)")
            self.db.execute("DELETE FROM wanted")
            self.db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)",
                                [(str(p),) for p in paths])
            cur = self.db.execute(select + " JOIN wanted w ON w.path = f.path ORDER BY f.path",
                                  (identity,))
        out = []
        for r in cur:
            d = dict(r)
            d["path"] = d.pop("file_path")
            d["format_ok"] = bool(d["format_ok"])
            out.append(d)
        return out

    # ------------------------------------------------------------------ report thumbnails

    def thumbs(self, keys: Iterable[str], size: int) -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {}
        for k in keys:
            r = self.db.execute("SELECT jpeg FROM thumbs WHERE sha256=? AND size=?",
                                (k, size)).fetchone()
            if r is not None:
                out[k] = r[0]
        return out

    def put_thumbs(self, items: Iterable[tuple[str, bytes | None]], size: int) -> None:
        self.db.executemany("INSERT OR REPLACE INTO thumbs (sha256, size, jpeg) VALUES (?, ?, ?)",
                            [(k, size, v) for k, v in items])

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

import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from qponder_mlx.safe_paths import shown

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


# A second qponder on one store waits this long for the write lock before giving up.
LOCK_WAIT_S = 30.0
LOCK_NOTICE_S = 2.0  # after this long it says that it is waiting
APP_MARK = "qponder-results"
OUR_TABLES = frozenset({"meta", "files", "results", "thumbs"})
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database


def _say(message: str) -> None:
    from qponder_mlx.progress import say

    say(message)


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


def _locked(e: sqlite3.OperationalError) -> bool:
    return "locked" in str(e) or "busy" in str(e)


def _existing_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise StoreError(f"{shown(path)}: cannot access the results database ({_one_line(e)}) — "
                         "check the path") from None


def _check_sqlite_header(path: Path) -> None:
    """Refuse a file that is not SQLite at all (a photo, a CSV) before sqlite3 touches it."""
    if not path.is_file():
        raise StoreError(f"{shown(path)}: not a file — pass a file path as --db")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(SQLITE_MAGIC))
    except OSError as e:
        raise StoreError(f"{shown(path)}: cannot read the results database ({_one_line(e)}) — "
                         "check its permissions") from None
    if magic != SQLITE_MAGIC:
        raise StoreError(f"{shown(path)}: not a qponder results database (not a SQLite file) — "
                         "pass a new --db path; this file is left as it is")


@dataclass(frozen=True)
class FileState:
    sha256: str
    size: int
    mtime_ns: int


class ResultStore:
    """A results database; open it with `ResultStore(path)` or `with ResultStore(path) as s:`.

    Opening never writes to a file that is not already ours: an existing file must be SQLite and
    carry our `meta` schema row (or be an empty database) before the first write — switching
    another program's database to WAL or adding our tables to it would change it for good. An
    existing store is checked with `PRAGMA quick_check` (every page and index readable, O(N),
    no cross-check of index contents), so a damaged page is named instead of read on silently.

    `lock_wait_s`: how long a write waits for another process holding the write lock (a second
    qponder on the same store); after `LOCK_NOTICE_S` it says it is waiting, at the end it
    raises StoreError. `on_wait` prints that message (default: one line on stderr).
    """

    def __init__(self, path: str | os.PathLike, *, lock_wait_s: float | None = None,
                 on_wait: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.lock_wait_s = LOCK_WAIT_S if lock_wait_s is None else lock_wait_s
        self._notice_s = min(LOCK_NOTICE_S, self.lock_wait_s)
        self._on_wait = on_wait or _say
        where = shown(self.path)
        existing = _existing_size(self.path) > 0
        if existing:
            _check_sqlite_header(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are explicit (`transaction()`), one per batch.
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=self._notice_s)
        except (sqlite3.Error, OSError) as e:  # no such folder, read-only folder
            raise StoreError(f"{where}: cannot open the results database ({_one_line(e)}) — "
                             "check the folder exists and is writable") from None
        try:
            self.db.row_factory = sqlite3.Row
            fresh, tables = self._check_ours() if existing else (True, set())
            if not fresh:
                self._quick_check()
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            if fresh or not tables >= OUR_TABLES:  # new, or from before a table existed
                with self.transaction():  # all tables and the marker, or none of them
                    for stmt in SCHEMA.split(";"):
                        if stmt.strip():
                            self.db.execute(stmt)
                    self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)",
                                    (SCHEMA_VERSION,))
                    self.db.execute("INSERT OR IGNORE INTO meta VALUES ('app', ?)", (APP_MARK,))
        except StoreError:
            self.db.close()
            raise
        except sqlite3.OperationalError as e:  # read-only, locked, disk full
            self.db.close()
            raise StoreError(f"{where}: cannot open the results database ({_one_line(e)}) — "
                             "check the folder is writable and has free space") from None
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise StoreError(f"{where}: not a qponder results database ({_one_line(e)}) — pass a "
                             "new --db path") from None

    def _check_ours(self) -> tuple[bool, set[str]]:
        """Reads only: (fresh, its tables). Fresh: an empty database, ours to set up; raises
        for another program's database."""
        where = shown(self.path)
        tables = {r[0] for r in self.db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")}
        if not tables:
            return True, tables
        row = None
        if "meta" in tables:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            # A store created before setup was one transaction could lose its marker to a kill
            # between the CREATEs and the INSERT; with only our tables and no result it is ours.
            if tables <= OUR_TABLES and ("results" not in tables or self.db.execute(
                    "SELECT COUNT(*) FROM results").fetchone()[0] == 0):
                return True, tables
            names = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            raise StoreError(f"{where}: a SQLite database of another program (tables: "
                             f"{shown(names)}) — qponder leaves it untouched; pass a new --db path")
        if row[0] != SCHEMA_VERSION:
            raise StoreError(f"{where}: results schema {shown(row[0])}, this qponder reads "
                             f"{SCHEMA_VERSION} — use a new --db path or a matching qponder")
        return False, tables

    def _quick_check(self) -> None:
        try:
            bad = [r[0] for r in self.db.execute("PRAGMA quick_check(3)") if r[0] != "ok"]
        except sqlite3.DatabaseError as e:
            bad = [str(e)]
        if bad:
            raise StoreError(f"{shown(self.path)}: the results store is damaged (quick_check: "
                             f"{shown(_one_line(bad[0]))}) — score into a new store with "
                             "--db new.sqlite (everything is scored again), or restore a backup "
                             "of this file; it is left as it is")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_error(self, e: BaseException) -> StoreError:
        return StoreError(f"{shown(self.path)}: cannot save to the results store "
                          f"({_one_line(e)}) — everything saved before is intact; free disk "
                          "space (or fix the folder's permissions) and rerun the same command to "
                          "resume")

    def _begin(self) -> None:
        """BEGIN IMMEDIATE (take the write lock now), waiting for another writer if need be."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as e:
            if not _locked(e):
                raise self._write_error(e) from None
        self._on_wait(f"{shown(self.path)}: another process is writing to this store — waiting "
                      f"up to {self.lock_wait_s:g} s for it to finish")
        rest_ms = int(max(0.0, self.lock_wait_s - self._notice_s) * 1000)
        self.db.execute(f"PRAGMA busy_timeout={rest_ms}")
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if _locked(e):
                raise StoreError(f"{shown(self.path)}: still locked by another process after "
                                 f"{self.lock_wait_s:g} s — let the other qponder finish (or "
                                 "stop it), then rerun the same command; everything saved "
                                 "before is intact") from None
            raise self._write_error(e) from None
        finally:
            self.db.execute(f"PRAGMA busy_timeout={int(self._notice_s * 1000)}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing: a crash or an exception inside leaves the store as it was. A failed
        write (disk full, read-only) raises StoreError; earlier transactions stay intact."""
        self._begin()
        try:
            yield self.db
        except BaseException as e:
            self._rollback()
            if isinstance(e, sqlite3.OperationalError):
                raise self._write_error(e) from None
            raise
        try:
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            self._rollback()
            raise self._write_error(e) from None

    def _rollback(self) -> None:
        # SQLite may have rolled back already (SQLITE_FULL can end the transaction itself).
        with suppress(sqlite3.OperationalError):
            self.db.execute("ROLLBACK")

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

    def identities(self) -> list[dict]:
        """One entry per scorer identity in the store, most recently scored first: identity,
        mode, model, adapter, results (count), last_scored_at."""
        rows = self.db.execute(
            "SELECT identity, MAX(mode) AS mode, MAX(model) AS model, MAX(adapter) AS adapter, "
            "COUNT(*) AS results, MAX(scored_at) AS last_scored_at FROM results "
            "GROUP BY identity ORDER BY last_scored_at DESC")
        return [dict(r) for r in rows]

    def drop_identity_results(self, identity: str, sha256s: Iterable[str]) -> None:
        """Delete `identity`'s results for these contents, other scorers' untouched (call
        inside a transaction): `qponder score --rescore`."""
        self.db.executemany("DELETE FROM results WHERE sha256=? AND identity=?",
                            [(s, identity) for s in sha256s])

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

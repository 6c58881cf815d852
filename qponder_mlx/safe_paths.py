"""Three small guards for what we print and what we write: one place each.

* `shown(text)`: a file name (or any text from outside) made safe to print on one terminal line.
  Control characters are written as `\\xNN` / `\\uNNNN`: an ESC sequence in a photo's name can no
  longer retitle or recolour the terminal, a newline can no longer forge a second message line
  (ECMA-48 control functions start with C0/C1 codes; str.splitlines also breaks on U+2028/9).
* `redact_url(url)` / `redact_secrets(text, url)`: a URL with `user:password@` prints as
  `***@host` — wherever we echo a URL (HTTP error lines, repr) the password stays out of logs.
* `check_output(...)`: refuse an output path that would destroy something we read — the results
  store, an input file — or an existing file that is not the kind of output we write there (a
  photo caught by a shell glob in `--report g/*.jpg`). Our own earlier output may be replaced;
  `force=True` allows replacing any other regular file, never the store or an input.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

# C0 controls, DEL, C1 controls, the Unicode line/paragraph separators and the bidi overrides
# (U+202A..E, U+2066..9: "Trojan Source", CVE-2021-42574, reorders what a terminal shows).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]|[\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def shown(text: object) -> str:
    """`text` as one printable line: control characters and lone surrogates (undecodable bytes of
    a file name) escaped, everything else as is."""
    return _UNSAFE.sub(_escape, os.fspath(text) if isinstance(text, os.PathLike) else str(text))


# ------------------------------------------------------------------------------ URLs


def redact_url(url: str) -> str:
    """`http://user:pass@host/v1` -> `http://***@host/v1`; other URLs unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/@]*@", "//***@", url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def url_secrets(url: str) -> list[str]:
    """The userinfo of `url` and its password, longest first (what `redact_secrets` removes)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    if "@" not in parts.netloc:
        return []
    userinfo = parts.netloc.rsplit("@", 1)[0]
    out = [userinfo]
    if ":" in userinfo:
        password = userinfo.split(":", 1)[1]
        if len(password) >= 3:  # a 1-2 character "password" would blank out ordinary text
            out.append(password)
    return sorted({s for s in out if s}, key=len, reverse=True)


def redact_secrets(text: str, url: str) -> str:
    """`text` with the userinfo and password of `url` replaced by `***` wherever they appear
    (httpx echoes the full URL in some exception texts)."""
    for secret in url_secrets(url):
        text = text.replace(secret, "***")
    return text


# ------------------------------------------------------------------------------ outputs


class OutputPathError(ValueError):
    """An output path we refuse to write; one line naming the option, the file and the fix."""


def _head(path: Path, n: int = 4096) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _first_json_line(path: Path, keys: set[str]) -> bool:
    """Does the first line of `path` look like a JSON object with `keys`? A line longer than
    the 1 MiB read (a row with many long attempts) is judged by its opening: `{` and the keys."""
    head = _head(path, 1 << 20)
    line, newline, _ = head.partition(b"\n")
    if newline:
        try:
            obj = json.loads(line)
        except ValueError:
            return False
        return isinstance(obj, dict) and keys <= set(obj)
    return line.lstrip().startswith(b"{") and all(b'"%s":' % k.encode() in line for k in keys)


def _is_csv_export(path: Path) -> bool:
    # tables.COLUMNS starts with these; an empty export still has its header.
    return _head(path, 256).lstrip(b"\xef\xbb\xbf").startswith(b"path,score,format_ok,")


def _is_jsonl_export(path: Path) -> bool:
    return path.stat().st_size == 0 or _first_json_line(path, {"path", "sha256", "identity"})


def _is_report(path: Path) -> bool:
    head = _head(path, 2048)
    # Reports from before the generator tag: the fixed CSP line that starts every report.
    return head.startswith(b"<!DOCTYPE html>") and (
        b'<meta name="generator" content="qponder' in head
        or b"content=\"default-src &#x27;none&#x27;; img-src data:;" in head)


def _is_json_object_with(keys: set[str]) -> Callable[[Path], bool]:
    def check(path: Path) -> bool:
        # Our JSON reports are written with indent=2: the keys we look for are in the first KiB.
        head = _head(path, 1 << 16).decode("utf-8", "replace")
        return head.lstrip().startswith("{") and all(f'"{k}"' in head for k in keys)
    return check


def _is_distill_rows(path: Path) -> bool:
    return path.stat().st_size == 0 or _first_json_line(path, {"teacher_model", "prompt_version"})


# kind -> (what it is, in a message; how to recognise a file we wrote)
OUTPUT_KINDS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "csv": ("qponder CSV export", _is_csv_export),
    "jsonl": ("qponder JSONL export", _is_jsonl_export),
    "report": ("qponder HTML report", _is_report),
    "eval_json": ("qponder eval report", _is_json_object_with({"n_labels", "metrics"})),
    "distill_rows": ("qponder distill output", _is_distill_rows),
    "distill_summary": ("qponder distill summary", _is_json_object_with({"kept", "reasons"})),
}


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_output(option: str, path: str | os.PathLike, kind: str, *,
                 store: str | os.PathLike | None = None,
                 inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> None:
    """Raise OutputPathError unless writing `path` (the value of `option`) is safe; see the
    module docstring. `inputs` are the files the command reads (label file, images)."""
    what, ours = OUTPUT_KINDS[kind]
    p = Path(path)
    name = shown(p)
    if store is not None:
        s = Path(store)
        same = os.path.abspath(p) == os.path.abspath(s)
        sidecar = any(os.path.abspath(p) == os.path.abspath(f"{s}{x}")
                      for x in ("-wal", "-shm", "-journal"))
        mine = _identity(p)
        if same or sidecar or (mine is not None and mine == _identity(s)):
            raise OutputPathError(f"{option} {name} is the results store (--db) — writing it "
                                  "would destroy the stored scores; pick another file name")
    mine = _identity(p)
    if mine is None:
        return  # nothing there yet (the folder is checked when we write)
    if p.is_dir():
        raise OutputPathError(f"{option} {name} is a folder — give a file name inside it")
    if any(_identity(Path(i)) == mine for i in inputs):
        raise OutputPathError(f"{option} {name} is one of the input files — writing it would "
                              "destroy it; pick another file name")
    if not p.is_file():
        raise OutputPathError(f"{option} {name} exists and is not a regular file — pick another "
                              "file name")
    if not force and not ours(p):
        raise OutputPathError(f"{option} {name} exists and is not a {what} — pick another file "
                              "name, or pass --force to overwrite it")


def check_distinct(outputs: dict[str, str | os.PathLike | None]) -> None:
    """Two options naming one file (`--csv x --jsonl x`): the second would overwrite the first."""
    seen: dict[str, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        key = os.path.abspath(path)
        if key in seen:
            raise OutputPathError(f"{option} and {seen[key]} name the same file {shown(path)} — "
                                  "give each its own name")
        seen[key] = option


# ------------------------------------------------------------------------------ write errors

_OS_REASONS = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.ENAMETOOLONG: "file name too long", errno.EIO: "input/output error"}
if hasattr(errno, "EDQUOT"):
    _OS_REASONS[errno.EDQUOT] = "disk quota exceeded"


def os_error_reason(e: OSError) -> str:
    """A short, one-line reason for a failed write: "disk full", "read-only file system"..."""
    return _OS_REASONS.get(e.errno) or " ".join(str(e.strerror or e).split()) or type(e).__name__

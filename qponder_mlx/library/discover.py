"""Find the image files under the paths a user gives: files and folders, in a stable order.

Folders are walked recursively by default. Hidden entries (a leading dot: `.git`, `.thumbnails`,
macOS `._IMG_0001.jpg` resource forks) are skipped because they hold caches and sidecars, not
photos. Symlinked folders are followed, but each real folder is entered once, so a link that
points back up the tree cannot loop. A file reached twice (two links, two overlapping arguments)
is listed once.

Two kinds of entry look like photos but cannot be scored: a link whose target is gone, and a
name that is not valid UTF-8 (the store, the exports and the terminal all need UTF-8 text).
They are not dropped: `Discovery.errors` lists them (the name shown with its bad bytes escaped,
and the reason), and `qponder score` stores each as an error row with a fix.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from qponder_mlx.io import file_kind
from qponder_mlx.safe_paths import shown

# Suffixes Pillow (+ pillow-heif for HEIC/HEIF) decodes; matched case-insensitively.
IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".heic", ".heif",
})


@dataclass
class Discovery:
    files: list[Path] = field(default_factory=list)  # absolute, sorted by path components
    problems: list[str] = field(default_factory=list)  # one line each: missing/locked paths
    skipped: int = 0  # files seen whose suffix is not an image suffix
    # Image entries that cannot be scored (broken links, non-UTF-8 names): (name as UTF-8 text,
    # reason — fix); each becomes an error row of the store.
    errors: list[tuple[str, str]] = field(default_factory=list)


BROKEN_LINK = "broken link (its target is gone) — fix or remove the link"
NOT_UTF8 = "file name is not valid UTF-8 — rename it (e.g. convmv -f latin1 -t utf8)"


def _utf8(path: str) -> bool:
    """False for a name os.listdir had to surrogate-escape (not UTF-8 on disk): SQLite, JSON and
    the terminal all need UTF-8 text."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(path: object) -> str:
    # Control characters escaped (an ESC sequence in a name must not drive the terminal, a
    # newline must not forge a second line); undecodable bytes shown as \udcXX escapes.
    return shown(path)


def _not_regular(path: str, mode: int) -> str:
    return (f"{_shown(path)}: not a regular file ({file_kind(mode)}) — only image files are "
            "read; remove it from the arguments")


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def discover(paths: Iterable[str | os.PathLike], *, recursive: bool = True) -> Discovery:
    """Image files named by `paths` (files, or folders to walk); see the module docstring."""
    found: dict[tuple[int, int], Path] = {}  # (device, inode) -> first path seen
    out = Discovery()
    for arg in paths:
        p = Path(os.path.abspath(os.path.expanduser(os.fspath(arg))))
        try:
            st = p.stat()
        except FileNotFoundError:
            out.problems.append(f"{_shown(arg)}: no such file or folder — check the path")
            continue
        except OSError as e:
            out.problems.append(f"{_shown(arg)}: cannot access ({e.strerror or e}) — check the "
                                "path")
            continue
        if stat.S_ISDIR(st.st_mode):
            _walk(p, recursive, found, out, visited=set())
        elif not stat.S_ISREG(st.st_mode):  # a FIFO or a device would hang or never end
            out.problems.append(_not_regular(str(p), st.st_mode))
        elif is_image_name(p.name) and not _utf8(str(p)):
            out.errors.append((_shown(str(p)), NOT_UTF8))
        elif is_image_name(p.name):
            found.setdefault((st.st_dev, st.st_ino), p)
        else:
            out.skipped += 1
    out.files = sorted(found.values(), key=lambda f: f.parts)
    out.errors = sorted(dict(out.errors).items())  # a name reached twice is one row
    return out


def _walk(root: Path, recursive: bool, found: dict, out: Discovery,
          visited: set[tuple[int, int]]) -> None:
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
        except OSError as e:
            out.problems.append(f"{_shown(folder)}: cannot access ({e.strerror or e}) — check "
                                "the path")
            continue
        if (st.st_dev, st.st_ino) in visited:
            continue  # a symlink loop, or a folder already walked through another link
        visited.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            out.problems.append(f"{_shown(folder)}: cannot list folder ({e.strerror or e}) — "
                                "fix its permissions")
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():  # follows symlinks; loops are stopped by `visited`
                    if recursive:
                        subdirs.append(Path(entry.path))
                    continue
                if not entry.is_file():
                    if entry.is_symlink() and is_image_name(entry.name):
                        try:
                            target = os.stat(entry.path)
                        except FileNotFoundError:
                            out.errors.append((_shown(entry.path), BROKEN_LINK))
                        else:  # a link to a FIFO or a device (/dev/zero) is not broken
                            out.problems.append(_not_regular(entry.path, target.st_mode))
                    continue  # sockets, fifos, devices
                est = entry.stat()
            except OSError as e:
                out.problems.append(f"{_shown(entry.path)}: cannot access "
                                    f"({e.strerror or e}) — check the file")
                continue
            if is_image_name(entry.name) and not _utf8(entry.path):
                out.errors.append((_shown(entry.path), NOT_UTF8))
            elif is_image_name(entry.name):
                found.setdefault((est.st_dev, est.st_ino), Path(entry.path))
            else:
                out.skipped += 1
        stack.extend(reversed(subdirs))

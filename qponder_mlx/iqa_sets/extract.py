"""Unpack a downloaded tar/zip archive without letting it write anywhere but its target.

An archive from the network is untrusted input. `tarfile.extractall` without a filter and
`zipfile.extractall` have a history of path traversal (CVE-2007-4559 for tarfile: `../` members
and absolute names; links pointing out of the target then written through), and a small archive
can expand to fill the disk (a "bomb"). `safe_extract` therefore:

* refuses members with an absolute name, a drive letter, a `..` component or a NUL byte;
* refuses symlinks and hard links whose target leaves the target folder, and never writes a file
  through an existing link (it is unlinked first, then opened with O_NOFOLLOW where the OS has it);
* refuses device files and FIFOs (an image set has none);
* stops at a ceiling on bytes written and on members, counting the bytes actually produced by the
  decompressor, not the sizes the archive declares;
* writes into a fresh staging folder: a refused archive leaves nothing behind but that folder,
  which it removes.

Any refusal raises `UnsafeArchive` with a one-line message naming the archive and the member.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

CHUNK = 1 << 20


class UnsafeArchive(ValueError):
    """The archive tried something outside the rules above (one line)."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int  # total bytes written
    max_files: int  # members (files, folders and links)


@dataclass(frozen=True)
class Extracted:
    files: int
    bytes: int
    top_level: tuple[str, ...]  # names directly under the target, sorted


def archive_kind(path: Path) -> str:
    """"zip" or "tar" from the file's own first bytes (the name may lie or be a cache blob)."""
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise UnsafeArchive(f"{path}: neither a tar nor a zip archive (damaged download?) — delete "
                        "it and rerun")


def safe_extract(archive: Path, target: Path, limits: Limits,
                 progress: Callable[[int], None] | None = None) -> Extracted:
    """Extract `archive` into `target` (created; must not exist) under `limits`.

    `progress(n)` is called with the number of archive bytes consumed since the last call.
    On any error `target` is removed again, so a caller can retry from scratch.
    """
    archive, target = Path(archive), Path(target)
    if target.exists():
        raise FileExistsError(f"{target} already exists")
    target.mkdir(parents=True)
    writer = _Writer(archive, target.resolve(), limits)
    try:
        if archive_kind(archive) == "zip":
            _extract_zip(archive, writer, progress)
        else:
            _extract_tar(archive, writer, progress)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    top = tuple(sorted(p.name for p in target.iterdir()))
    return Extracted(writer.files, writer.bytes, top)


class _Writer:
    def __init__(self, archive: Path, root: Path, limits: Limits):
        self.archive, self.root, self.limits = archive, root, limits
        self.files = self.bytes = 0

    def refuse(self, member: str, why: str) -> UnsafeArchive:
        shown = member.encode("unicode_escape").decode("ascii")
        return UnsafeArchive(f"{self.archive.name}: refused member {shown!r}: {why} — the "
                             "archive is unsafe; nothing was extracted")

    def path_for(self, name: str) -> Path:
        """Checked destination of a member name: relative, no `..`, inside the root."""
        if "\x00" in name:
            raise self.refuse(name, "NUL byte in the name")
        norm = name.replace("\\", "/")
        pure = PurePosixPath(norm)
        if norm.startswith("/") or pure.is_absolute() or (len(norm) > 1 and norm[1] == ":"):
            raise self.refuse(name, "absolute path")
        parts = [p for p in pure.parts if p not in ("", ".")]
        if ".." in parts:
            raise self.refuse(name, "'..' in the path leaves the target folder")
        if not parts:
            raise self.refuse(name, "empty name")
        dest = self.root.joinpath(*parts)
        # An earlier member may have made a folder on the way a symlink: resolve what exists.
        parent = Path(os.path.realpath(dest.parent))
        if parent != self.root and self.root not in parent.parents:
            raise self.refuse(name, "its folder is a link that leaves the target folder")
        return dest

    def count(self, name: str) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise self.refuse(name, f"more than {self.limits.max_files:,} members (archive "
                                    "bomb?)")

    def mkdir(self, name: str) -> None:
        self.count(name)
        dest = self.path_for(name)
        if dest.is_symlink():
            raise self.refuse(name, "a folder would replace a link")
        dest.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, stream, declared: int) -> None:
        self.count(name)
        dest = self.path_for(name)
        if self.bytes + declared > self.limits.max_bytes:
            raise self._too_big(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            if dest.is_dir() and not dest.is_symlink():
                raise self.refuse(name, "a file would replace a folder")
            dest.unlink()  # never write through a link a previous member left here
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(dest, flags, 0o644)
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(CHUNK):
                self.bytes += len(chunk)
                if self.bytes > self.limits.max_bytes:
                    raise self._too_big(name)
                out.write(chunk)

    def _too_big(self, name: str) -> UnsafeArchive:
        gb = self.limits.max_bytes / 1e9
        return self.refuse(name, f"expands past the {gb:.3g} GB ceiling (archive bomb?)")

    def link(self, name: str, target: str, hard: bool) -> None:
        self.count(name)
        dest = self.path_for(name)
        if "\x00" in target:
            raise self.refuse(name, "NUL byte in the link target")
        t = target.replace("\\", "/")
        if t.startswith("/") or (len(t) > 1 and t[1] == ":"):
            raise self.refuse(name, f"link to an absolute path {target!r}")
        # Hard-link targets are archive names; symlink targets are relative to the link.
        base = self.root if hard else dest.parent
        resolved = Path(os.path.normpath(base / t))
        if resolved != self.root and self.root not in resolved.parents:
            raise self.refuse(name, f"link to {target!r} leaves the target folder")
        if dest.is_symlink() or dest.exists():
            raise self.refuse(name, "a link would replace an existing member")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if hard:
            # A copy, not a link: the target must already be a regular file we wrote.
            src = self.path_for(t)
            if src.is_symlink() or not src.is_file():
                raise self.refuse(name, f"hard link to {target!r}, which is not a file here")
            with open(src, "rb") as f:
                self.write_counted(name, dest, f, src.stat().st_size)
        else:
            os.symlink(t, dest)

    def write_counted(self, name: str, dest: Path, stream, declared: int) -> None:
        # Like write() without a second member count (the link was counted already).
        self.files -= 1
        self.write(name, stream, declared)


def _extract_tar(archive: Path, w: _Writer, progress) -> None:
    with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tf:
        seen = 0
        for m in tf:
            if m.isdir():
                w.mkdir(m.name)
            elif m.isfile():
                stream = tf.extractfile(m)
                w.write(m.name, stream, m.size)
            elif m.issym():
                w.link(m.name, m.linkname, hard=False)
            elif m.islnk():
                w.link(m.name, m.linkname, hard=True)
            else:
                kind = "device file" if (m.ischr() or m.isblk()) else "FIFO" if m.isfifo() \
                    else f"member type {m.type!r}"
                raise w.refuse(m.name, f"{kind} (an image set has none)")
            if progress is not None:
                now = raw.tell()
                progress(now - seen)
                seen = now


def _extract_zip(archive: Path, w: _Writer, progress) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            mode = info.external_attr >> 16
            if info.flag_bits & 0x1:
                raise w.refuse(info.filename, "encrypted member")
            if stat.S_ISLNK(mode):
                if info.file_size > 4096:
                    raise w.refuse(info.filename, "link target longer than 4096 bytes")
                target = zf.read(info).decode("utf-8", "replace")
                w.link(info.filename, target, hard=False)
            elif info.is_dir():
                w.mkdir(info.filename)
            elif mode and not (stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0):
                raise w.refuse(info.filename, "special file (an image set has none)")
            else:
                with zf.open(info) as stream:
                    w.write(info.filename, stream, info.file_size)
            if progress is not None:
                progress(info.compress_size)


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))

"""Build a folder next to its destination and move it into place in one rename.

Nothing is ever written inside `out` itself: the bundle is assembled in a hidden sibling
(`.NAME.partial-XXXX`, same filesystem, so the final `rename` is atomic) and removed on any
error, Ctrl-C included. Readers therefore see either the old folder or the complete new one.
Only a hard kill (power loss, SIGKILL) can leave a `.partial-` folder behind; it is never
mistaken for a bundle (no qponder.json until the very end) and can be deleted.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputExistsError(FileExistsError):
    """--out exists and holds files; the message says how to proceed."""


def check_destination(out: Path, force: bool) -> None:
    """Refuse early (before any model is loaded) when `out` cannot be written."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder — choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out}: folder exists and is not empty — pass --force to "
                                "replace it, or choose another --out")


def _fsync_tree(folder: Path) -> None:
    # Data must be on disk before the rename publishes it, or a crash could expose a bundle
    # whose files are still zero-filled.
    for root, _, files in os.walk(folder):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _default_mode(folder: Path) -> None:
    # mkdtemp makes the folder private (0700); a published bundle gets the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def _publish(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        return
    # --force over a non-empty folder: set the old one aside, move the new one in, then delete
    # the old one. If the second rename fails, the old folder goes back.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_folder(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`; on success it becomes `out`, else it vanishes."""
    out = Path(out).expanduser().absolute()
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _default_mode(tmp)
        yield tmp
        _fsync_tree(tmp)
        check_destination(out, force)  # something may have appeared while we worked
        _publish(tmp, out)
    except RuntimeError as e:
        # MLX's own file writer (mx.save_safetensors) fails with a RuntimeError and no errno;
        # name it as the OSError it is, read while the disk is still as full as it was.
        full = "Unable to write" in str(e) and shutil.disk_usage(tmp).free < 4 << 20
        shutil.rmtree(tmp, ignore_errors=True)
        if "Unable to write" in str(e):
            raise OSError(errno.ENOSPC if full else errno.EIO, str(e)) from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

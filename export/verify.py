"""Check a bundle against its manifest: every problem is one line that names the file."""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from qponder_mlx.model import ModelLoadError

from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MANIFEST_SHA,
    bundle_files,
    read_checksum_line,
    sha256_file,
)
from .safetensors_header import HeaderError, read_header

# Files an OS or a file manager drops into folders on its own; never part of the model.
IGNORED = {".DS_Store", "Thumbs.db", "desktop.ini"}


class BundleError(ModelLoadError):
    """A bundle that is missing, incomplete, tampered with or unreadable (one line)."""


@dataclass
class VerifyResult:
    folder: Path
    problems: list[str] = field(default_factory=list)
    manifest: dict | None = None
    files_checked: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_failed(self) -> None:
        if self.problems:
            more = len(self.problems) - 1
            tail = f" (and {more} more problem{'s' * (more > 1)}: run `qponder bundle verify " \
                   f"{self.folder}`)" if more else ""
            raise BundleError(self.problems[0] + tail)


def read_manifest(folder: Path, result: VerifyResult | None = None) -> dict | None:
    """The manifest, after checking it against qponder.json.sha256; problems go to `result`."""
    result = result if result is not None else VerifyResult(folder)
    mpath, spath = folder / MANIFEST, folder / MANIFEST_SHA
    if not mpath.is_file():
        result.problems.append(f"{mpath}: missing — not a qponder bundle (export one with "
                               "`qponder export`)")
        return None
    if not spath.is_file():
        result.problems.append(f"{spath}: missing — the manifest cannot be checked; re-export "
                               "the bundle")
        return None
    want = read_checksum_line(spath)
    if want is None:
        result.problems.append(f"{spath}: not a `<sha256>  {MANIFEST}` line — re-export the "
                               "bundle")
        return None
    data = mpath.read_bytes()
    if hashlib.sha256(data).hexdigest() != want:
        result.problems.append(f"{mpath}: edited or corrupted (sha256 differs from {MANIFEST_SHA})"
                               " — re-export the bundle")
        return None
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as e:
        result.problems.append(f"{mpath}: not valid JSON ({e.msg}, line {e.lineno})")
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        result.problems.append(f"{mpath}: not a {FORMAT} manifest")
        return None
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        result.problems.append(f"{mpath}: format_version {version!r} is newer than this qponder "
                               f"reads ({FORMAT_VERSION}) — upgrade qponder-mlx")
        return None
    if not isinstance(manifest.get("files"), dict):
        result.problems.append(f"{mpath}: has no `files` table")
        return None
    result.manifest = manifest
    return manifest


def _safe(rel: str) -> bool:
    # A crafted manifest must not make us read outside the bundle.
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel


def _not_regular(folder: Path, rel: str) -> str | None:
    """Why `folder/rel` is not a plain file inside the bundle, or None if it is one.

    A symlink can point anywhere (a weight "file" that is really /dev/zero, or a file outside
    the bundle that changes later) and a directory crashes the loader after verify said OK.
    """
    path = folder
    for part in PurePosixPath(rel).parts:
        path = path / part
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return "missing"
        if stat.S_ISLNK(mode):
            return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    return None if stat.S_ISREG(mode) else "not a regular file"


def verify_bundle(folder: str | Path, *,
                  on_file: Callable[[str, int], None] | None = None) -> VerifyResult:
    """Recompute every checksum; report missing, changed, resized and unexpected files.

    `on_file(name, size)` is called after each file is hashed (progress bars).
    """
    folder = Path(folder)
    result = VerifyResult(folder)
    if not folder.is_dir():
        result.problems.append(f"{folder}: no such folder — pass the bundle folder")
        return result
    manifest = read_manifest(folder, result)
    if manifest is None:
        return result
    table: dict = manifest["files"]
    for rel in sorted(table):
        entry = table[rel]
        path = folder / rel
        if not _safe(rel) or not isinstance(entry, dict):
            result.problems.append(f"{folder / MANIFEST}: bad file entry {rel!r}")
            continue
        why = _not_regular(folder, rel)
        if why == "missing":
            result.problems.append(f"{path}: missing (listed in {MANIFEST}) — the bundle is "
                                   "incomplete; copy it again or re-export")
            continue
        if why is not None:
            result.problems.append(f"{path}: {why}, not a plain file — copy the bundle without "
                                   "links (cp -R, not cp -s) or re-export it")
            continue
        size = path.stat().st_size
        if size != entry.get("size"):
            result.problems.append(f"{path}: size {size} bytes, the manifest says "
                                   f"{entry.get('size')} — the file was changed or truncated")
            continue
        if sha256_file(path) != entry.get("sha256"):
            result.problems.append(f"{path}: sha256 differs from the manifest — the file was "
                                   "changed or corrupted; re-export the bundle")
        elif rel.endswith(".safetensors"):
            # A matching checksum only says the file is the one exported; the header is what a
            # loader trusts for sizes, so it is checked before anything loads it.
            try:
                read_header(path)
            except HeaderError as e:
                result.problems.append(str(e))
        result.files_checked += 1
        result.bytes_checked += size
        if on_file:
            on_file(rel, size)
    for rel in bundle_files(folder):
        if rel not in table and PurePosixPath(rel).name not in IGNORED:
            # An extra file can change what loads (a second weight shard, a chat template,
            # an adapter_config.json), so the bundle is exactly what the manifest lists.
            result.problems.append(f"{folder / rel}: not in the manifest — remove it or "
                                   "re-export the bundle")
    return result

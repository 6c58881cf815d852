"""Builders for synthetic images and dataset label files in their published layouts."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image


def make_image(path: Path, size: tuple[int, int] = (8, 8), color=(120, 60, 30)) -> Path:
    """A tiny solid image; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def make_images(root: Path, names: Iterable[str]) -> None:
    for name in names:
        make_image(root / name)


def write_csv(
    path: Path,
    header: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    bom: bool = False,
    crlf: bool = False,
) -> Path:
    """Write a CSV by hand so BOM and line endings are exactly what the test asks for."""
    eol = "\r\n" if crlf else "\n"
    lines = [",".join(header), *(",".join(str(v) for v in row) for row in rows)]
    text = eol.join(lines) + eol
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares width x height but whose pixel data is a few bytes.

    Decoding it would fail (or explode); only a size check before decoding passes cleanly.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    body = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + _chunk(b"IEND", b""))
    return path

"""The bad-input corpus: every kind of broken image and label file we promise to survive.

Each kind is generated on the fly (nothing binary is checked in) and carries its expected
outcome, so the tests and docs/reliability.md read from one table:

* images (`IMAGE_KINDS`): `scored` (we must read it), `error` with the short reason the
  `qponder score` summary counts it under (`qponder_mlx.library.score_job.error_reason`), or
  `skipped` (a path discovery cannot use: one "skipped:" line, no row);
* label rows (`LABEL_ROW_KINDS`): one row of a JSONL file each, `skipped` with the words its
  one-line problem must contain, or `usable`;
* label files (`LABEL_FILE_KINDS`): a whole file, `usable` or `refused` (nothing can be done:
  exit code 2 with one line).

`build_images(folder)` writes the image kinds, `build_label_rows(folder, images_root)` the row
kinds, `build_label_file(kind, folder, images_root)` one file kind. A kind with `xfail` is a gap
found by this suite and not fixed yet (the owner's file); its test is marked xfail(strict).
`write_long_line_jsonl` streams a multi-hundred-MB line to disk in chunks, never holding it in
memory.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

GOOD_SIZE = (64, 48)  # small: the tiny model scores it at 56-112 px


@dataclass(frozen=True)
class Kind:
    name: str
    what: str  # one line for the docs table
    # images: scored | error (a row with an error) | skipped (a "skipped:" line, no row) |
    # ignored; label rows: skipped | usable; label files: usable | refused (exit 2)
    outcome: str
    reason: str = ""  # error: the summary's reason; otherwise words the one line contains
    xfail: str = ""  # a known gap: why the expected outcome does not hold yet


# --------------------------------------------------------------------------------------------
# Images


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height over a few bytes of pixel data (a bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + _chunk(b"IEND", b""))
    return path


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _truncated_jpeg(d: Path) -> Path:
    data = _encoded(_noise((96, 64), 1), "JPEG", quality=90)
    p = d / "truncated.jpg"
    p.write_bytes(data[: len(data) // 2])
    return p


def _truncated_png(d: Path) -> Path:
    data = _encoded(_noise((96, 64), 2), "PNG")
    p = d / "truncated.png"
    p.write_bytes(data[: len(data) // 3])  # the header survives: fails only when decoded
    return p


def _zero_byte(d: Path) -> Path:
    p = d / "zero_byte.jpg"
    p.write_bytes(b"")
    return p


def _text_as_jpg(d: Path) -> Path:
    p = d / "notes_named.jpg"
    p.write_text("shopping list: eggs, milk, a better camera\n")
    return p


def _html_as_png(d: Path) -> Path:
    p = d / "saved_page.png"
    p.write_text("<!DOCTYPE html><html><head><title>Photo</title></head>"
                 "<body><img src='photo.png'></body></html>\n")
    return p


def _bomb_pillow(d: Path) -> Path:
    # 10^10 declared pixels: Pillow itself refuses the header (over 2x its MAX_IMAGE_PIXELS).
    return png_with_header(d / "bomb_10gpx.png", 100_000, 100_000)


def _bomb_guard(d: Path) -> Path:
    # 81 Mpx: under Pillow's own refusal, over our 80 Mpx guard; decoding would give "truncated".
    return png_with_header(d / "bomb_81mpx.png", 9_000, 9_000)


def _cmyk_jpeg(d: Path) -> Path:
    p = d / "cmyk.jpg"
    _noise(GOOD_SIZE, 3).convert("CMYK").save(p, quality=90)
    return p


def _png16(d: Path) -> Path:
    p = d / "gray16.png"
    a = np.linspace(0, 65535, GOOD_SIZE[0] * GOOD_SIZE[1]).reshape(GOOD_SIZE[1], GOOD_SIZE[0])
    Image.fromarray(a.astype(np.uint16)).save(p)
    return p


def _gray_alpha(d: Path) -> Path:
    p = d / "gray_alpha.png"
    g = _noise(GOOD_SIZE, 4).convert("L")
    alpha = Image.new("L", GOOD_SIZE, 128)
    Image.merge("LA", (g, alpha)).save(p)
    return p


def _palette_transparency(d: Path) -> Path:
    p = d / "palette_transparent.png"
    im = _noise(GOOD_SIZE, 5).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    im.save(p, transparency=0)
    return p


def _frames() -> list[Image.Image]:
    return [Image.new("RGB", GOOD_SIZE, c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]


def _animated_gif(d: Path) -> Path:
    p = d / "animated.gif"
    f = _frames()
    f[0].save(p, save_all=True, append_images=f[1:], duration=80, loop=0)
    return p


def _animated_webp(d: Path) -> Path:
    p = d / "animated.webp"
    f = _frames()
    f[0].save(p, save_all=True, append_images=f[1:], duration=80, loop=0)
    return p


def _exif_rotated(d: Path) -> Path:
    p = d / "exif_rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    _noise(GOOD_SIZE, 6).save(p, exif=exif, quality=90)
    return p


def _one_pixel(d: Path) -> Path:
    p = d / "one_pixel.png"
    Image.new("RGB", (1, 1), (90, 120, 200)).save(p)
    return p


def _strip(d: Path) -> Path:
    p = d / "strip_20000x20.png"
    Image.new("RGB", (20_000, 20), (120, 120, 120)).save(p)
    return p


def _corrupt_exif(d: Path) -> Path:
    p = d / "corrupt_exif.jpg"
    _noise(GOOD_SIZE, 7).save(p, exif=b"Exif\x00\x00MM\x00*garbage-not-a-tiff-block", quality=90)
    return p


def _unreadable(d: Path) -> Path:
    p = d / "no_permission.jpg"
    _noise(GOOD_SIZE, 8).save(p, quality=90)
    p.chmod(0)  # root reads it anyway: the tests simulate the refusal there (see is_root)
    return p


def _broken_symlink(d: Path) -> Path:
    p = d / "broken_link.jpg"
    p.symlink_to(d / "deleted_long_ago.jpg")
    return p


def _symlink_loop(d: Path) -> Path:
    a, b = d / "loop_a.jpg", d / "loop_b.jpg"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


NON_UTF8_NAME = b"caf\xe9_latin1.jpg"  # a Latin-1 name from an old camera or a Windows share


def _non_utf8_name(d: Path) -> Path:
    raw = os.path.join(os.fsencode(d), NON_UTF8_NAME)
    _noise(GOOD_SIZE, 9).save(os.fsdecode(raw), format="JPEG", quality=90)
    return Path(os.fsdecode(raw))  # surrogate-escaped str, as os.listdir returns it


def _folder_named_jpg(d: Path) -> Path:
    p = d / "album.jpg"
    p.mkdir()
    return p


# Error rows made at discovery (never handed to the scorer), checked by their own tests
# (test_broken_symlink_is_an_error_row, test_non_utf8_file_name_does_not_stop_the_job), so the
# whole-corpus runs leave them out.
_OWN_TEST = "checked by its own test in test_reliability_inputs.py"

IMAGE_KINDS: list[Kind] = [
    Kind("truncated_jpeg", "JPEG cut in half", "error", "truncated or corrupt"),
    Kind("truncated_png", "PNG cut to a third (header intact)", "error", "truncated or corrupt"),
    Kind("zero_byte", "0-byte .jpg", "error", "empty file"),
    Kind("text_as_jpg", "text file named .jpg", "error", "not an image"),
    Kind("html_as_png", "HTML page saved as .png", "error", "not an image"),
    Kind("bomb_pillow", "PNG header declaring 100000x100000 px", "error",
         "too many pixels (decompression bomb)"),
    Kind("bomb_guard", "PNG header declaring 9000x9000 px (over our 80 Mpx guard)", "error",
         "too many pixels (decompression bomb)"),
    Kind("cmyk_jpeg", "CMYK JPEG", "scored"),
    Kind("png16", "16-bit grayscale PNG", "scored"),
    Kind("gray_alpha", "grayscale + alpha PNG", "scored"),
    Kind("palette_transparency", "palette PNG with a transparent index", "scored"),
    Kind("animated_gif", "3-frame animated GIF", "scored"),
    Kind("animated_webp", "3-frame animated WebP", "scored"),
    Kind("exif_rotated", "JPEG with EXIF orientation 6", "scored"),
    Kind("one_pixel", "1x1 PNG", "scored"),
    Kind("strip", "20000x20 strip (1000:1)", "error", "extreme aspect ratio"),
    Kind("corrupt_exif", "JPEG with a garbage EXIF block", "scored"),
    Kind("unreadable", "file without read permission (simulated when running as root)",
         "error", "permission denied"),
    Kind("broken_symlink", "dangling symlink named .jpg", "error", "broken link",
         xfail=_OWN_TEST),
    Kind("symlink_loop", "two .jpg links pointing at each other", "skipped",
         "Too many levels of symbolic links"),
    Kind("non_utf8_name", "valid JPEG whose file name is not UTF-8 (Latin-1 byte 0xE9)",
         "error", "file name is not valid UTF-8", xfail=_OWN_TEST),
    Kind("folder_named_jpg", "a folder named album.jpg", "ignored"),
]

IMAGE_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "truncated_jpeg": _truncated_jpeg, "truncated_png": _truncated_png, "zero_byte": _zero_byte,
    "text_as_jpg": _text_as_jpg, "html_as_png": _html_as_png, "bomb_pillow": _bomb_pillow,
    "bomb_guard": _bomb_guard, "cmyk_jpeg": _cmyk_jpeg, "png16": _png16,
    "gray_alpha": _gray_alpha, "palette_transparency": _palette_transparency,
    "animated_gif": _animated_gif, "animated_webp": _animated_webp,
    "exif_rotated": _exif_rotated, "one_pixel": _one_pixel, "strip": _strip,
    "corrupt_exif": _corrupt_exif, "unreadable": _unreadable,
    "broken_symlink": _broken_symlink, "symlink_loop": _symlink_loop,
    "non_utf8_name": _non_utf8_name, "folder_named_jpg": _folder_named_jpg,
}


def build_images(folder: Path, kinds: list[Kind] = IMAGE_KINDS) -> dict[str, Path]:
    """Write one file per image kind into `folder`; kind name -> its path."""
    folder.mkdir(parents=True, exist_ok=True)
    return {k.name: IMAGE_BUILDERS[k.name](folder) for k in kinds}


def good_image(path: Path, seed: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _noise(GOOD_SIZE, seed).save(path)
    return path


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------------------------
# Label rows: one JSONL line each (read with --images-root, so the root rule applies)

LABEL_ROW_KINDS: list[Kind] = [
    Kind("mos_nan", 'MOS written as NaN', "skipped", "not a finite number"),
    Kind("mos_nan_string", 'MOS written as the string "nan"', "skipped", "not a finite number"),
    Kind("mos_inf", "MOS written as Infinity", "skipped", "not a finite number"),
    Kind("mos_empty", 'MOS is ""', "skipped", "MOS is empty"),
    Kind("mos_null", "MOS is null", "skipped", "MOS is empty"),
    Kind("mos_text", 'MOS is "good"', "skipped", "is not a number"),
    Kind("mos_bool", "MOS is true", "skipped", "is not a number"),
    Kind("mos_above_range", "MOS 7.5 on a 1-5 file", "skipped", "outside the declared range"),
    Kind("mos_below_range", "MOS -1 on a 1-5 file", "skipped", "outside the declared range"),
    Kind("missing_key", "row without the mos key", "skipped", "no 'mos' key"),
    Kind("duplicate_id", "second row with an id already used", "skipped", "duplicate id"),
    Kind("dotdot_path", "image path ../outside.png", "skipped", "leaves the images root"),
    Kind("absolute_outside", "absolute image path outside the root", "skipped",
         "leaves the images root"),
    Kind("missing_image", "image file that does not exist", "skipped", "image not found"),
    Kind("image_not_an_image", "image path pointing at a text file", "skipped", "unreadable"),
    Kind("not_json", "a line that is not JSON", "skipped", "not valid JSON"),
    Kind("not_an_object", "a line that is a JSON list", "skipped", "expected an object"),
    Kind("negative_std", "mos_std -0.2", "skipped", "is negative"),
]


def build_label_rows(folder: Path, images_root: Path) -> tuple[Path, dict[str, int], int]:
    """A JSONL with 3 good rows first and one row per LABEL_ROW_KINDS after them.

    Returns (path, kind -> its line number, number of good rows)."""
    images_root.mkdir(parents=True, exist_ok=True)
    goods = [good_image(images_root / f"good_{i}.png", seed=20 + i).name for i in range(3)]
    (images_root / "notes.png").write_text("not an image")
    outside = good_image(folder / "outside.png", seed=30)
    lines: list[str] = [json.dumps({"image": g, "mos": 2.0 + i, "id": f"g{i}"})
                        for i, g in enumerate(goods)]
    rows: dict[str, str] = {
        "mos_nan": '{"image": "good_0.png", "mos": NaN, "id": "r_nan"}',
        "mos_nan_string": json.dumps({"image": "good_0.png", "mos": "nan", "id": "r_nans"}),
        "mos_inf": '{"image": "good_0.png", "mos": Infinity, "id": "r_inf"}',
        "mos_empty": json.dumps({"image": "good_0.png", "mos": "", "id": "r_empty"}),
        "mos_null": json.dumps({"image": "good_0.png", "mos": None, "id": "r_null"}),
        "mos_text": json.dumps({"image": "good_0.png", "mos": "good", "id": "r_text"}),
        "mos_bool": json.dumps({"image": "good_0.png", "mos": True, "id": "r_bool"}),
        "mos_above_range": json.dumps({"image": "good_1.png", "mos": 7.5, "id": "r_hi"}),
        "mos_below_range": json.dumps({"image": "good_1.png", "mos": -1, "id": "r_lo"}),
        "missing_key": json.dumps({"image": "good_1.png", "id": "r_nokey"}),
        "duplicate_id": json.dumps({"image": "good_2.png", "mos": 3.0, "id": "g0"}),
        "dotdot_path": json.dumps({"image": "../outside.png", "mos": 3.0, "id": "r_dotdot"}),
        "absolute_outside": json.dumps({"image": str(outside), "mos": 3.0, "id": "r_abs"}),
        "missing_image": json.dumps({"image": "gone.png", "mos": 3.0, "id": "r_gone"}),
        "image_not_an_image": json.dumps({"image": "notes.png", "mos": 3.0, "id": "r_txt"}),
        "not_json": '{"image": "good_0.png", "mos": 3.0,',
        "not_an_object": json.dumps(["good_0.png", 3.0]),
        "negative_std": json.dumps({"image": "good_2.png", "mos": 3.0, "mos_std": -0.2,
                                    "id": "r_std"}),
    }
    assert set(rows) == {k.name for k in LABEL_ROW_KINDS}
    line_of: dict[str, int] = {}
    for k in LABEL_ROW_KINDS:
        lines.append(rows[k.name])
        line_of[k.name] = len(lines)
    path = folder / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, line_of, len(goods)


# --------------------------------------------------------------------------------------------
# Label files: one file per kind


LONG_LINE_BYTES = 200 * 1024 * 1024

LABEL_FILE_KINDS: list[Kind] = [
    Kind("csv_bom_crlf", "CSV saved by Excel: UTF-8 BOM and CRLF line ends", "usable"),
    Kind("csv_semicolon", "CSV with ';' separators and ',' in names", "usable"),
    Kind("csv_missing_column", "CSV without a MOS column", "refused", "missing MOS column"),
    Kind("csv_not_utf8", "CSV in Latin-1", "refused", "not UTF-8"),
    Kind("json_not_a_list", "Q-Align JSON whose top level is an object", "refused",
         "top level is a JSON object"),
    Kind("json_broken", "Q-Align JSON cut mid-way", "refused", "not valid JSON"),
    Kind("jsonl_long_line", "JSONL with one 200 MB line between good lines", "usable",
         "longer than"),
    Kind("empty_file", "an empty .jsonl", "refused", "no usable samples"),
    Kind("unknown_suffix", "labels.parquet", "refused", "unknown label format"),
]


def write_long_line_jsonl(path: Path, good_lines: list[str], size: int = LONG_LINE_BYTES,
                          chunk: int = 1 << 20) -> Path:
    """good line, one `size`-byte JSON line, the other good lines — written in `chunk`s."""
    with path.open("w", encoding="utf-8") as f:
        f.write(good_lines[0] + "\n")
        head = '{"image": "good_0.png", "mos": 3.0, "id": "huge", "pad": "'
        f.write(head)
        left = size - len(head) - 3
        block = "x" * chunk
        while left > 0:
            n = min(chunk, left)
            f.write(block if n == chunk else block[:n])
            left -= n
        f.write('"}\n')
        for line in good_lines[1:]:
            f.write(line + "\n")
    return path


def build_label_file(kind: str, folder: Path, images_root: Path) -> Path:
    """The label file of one LABEL_FILE_KINDS kind; images live in `images_root`."""
    folder.mkdir(parents=True, exist_ok=True)
    goods = [good_image(images_root / f"good_{i}.png", seed=40 + i).name for i in range(3)]
    if kind == "csv_bom_crlf":
        body = "image,mos\r\n" + "".join(f"{g},{2 + i}\r\n" for i, g in enumerate(goods))
        p = folder / "excel.csv"
        p.write_bytes(b"\xef\xbb\xbf" + body.encode())
    elif kind == "csv_semicolon":
        good_image(images_root / "a,b.png", seed=44)
        p = folder / "semi.csv"
        p.write_text("image;mos\n" + "".join(f"{g};{2 + i}\n" for i, g in enumerate(goods))
                     + "a,b.png;4\n")
    elif kind == "csv_missing_column":
        p = folder / "nomos.csv"
        p.write_text("image,quality_votes\n" + "".join(f"{g},12\n" for g in goods))
    elif kind == "csv_not_utf8":
        p = folder / "latin1.csv"
        p.write_bytes("image,mos\ncaf\u00e9.png,3\n".encode("latin-1"))
    elif kind == "json_not_a_list":
        p = folder / "meta.json"
        p.write_text(json.dumps({"images": [{"image": g, "gt_score": 3.0} for g in goods]}))
    elif kind == "json_broken":
        p = folder / "cut.json"
        p.write_text(json.dumps([{"image": g, "gt_score": 3.0} for g in goods])[:40])
    elif kind == "jsonl_long_line":
        p = write_long_line_jsonl(folder / "long.jsonl", [
            json.dumps({"image": g, "mos": 2.0 + i, "id": f"g{i}"}) for i, g in enumerate(goods)])
    elif kind == "empty_file":
        p = folder / "empty.jsonl"
        p.write_text("")
    elif kind == "unknown_suffix":
        p = folder / "labels.parquet"
        p.write_bytes(b"PAR1\x00\x00")
    else:
        raise KeyError(kind)
    return p


ALL_KINDS = IMAGE_KINDS + LABEL_ROW_KINDS + LABEL_FILE_KINDS

"""Robust image loading and the Qwen2.5-VL pixel budget.

`load_image` turns whatever a user points us at (HEIC, CMYK JPEG, 16-bit PNG, animated GIF,
rotated phone photo...) into one fully decoded RGB image, or raises `ImageError` with a single
line that names the file and says what to do. `PixelPolicy` then resizes it once, to exactly the
size Qwen2.5-VL's processor would pick, so the processor never resamples again and the number of
image tokens is known up front.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own guard (Image.MAX_IMAGE_PIXELS, ~89 Mpx) only warns; ours is a hard, earlier stop
# set a little lower so a bomb is refused before Pillow even gets to its warning.
MAX_IMAGE_PIXELS = 80_000_000

# Qwen2.5-VL: 14 px ViT patches merged 2x2, so one LLM token covers a 28x28 block.
PATCH_FACTOR = 28
MAX_ASPECT_RATIO = 200

# The processor defaults of Qwen2.5-VL-*-Instruct (preprocessor_config.json).
QWEN_MIN_PIXELS = 4 * 28 * 28
QWEN_MAX_PIXELS = 16384 * 28 * 28


class ImageError(ValueError):
    """An image that cannot be used; the message is one line naming the file and the reason."""


_heif_registered = False


def ensure_heif_support() -> None:
    """Teach Pillow HEIC/HEIF once, on first use (importing pillow-heif costs startup time)."""
    global _heif_registered
    if _heif_registered:
        return
    _heif_registered = True
    try:
        import pillow_heif
    except ImportError:  # optional: without it .heic files fail as "not an image"
        return
    pillow_heif.register_heif_opener()


def _fail(path: str | os.PathLike, reason: str, hint: str) -> ImageError:
    # Exception texts from decoders may span lines; the contract is one line.
    reason = " ".join(str(reason).split())
    return ImageError(f"{path}: {reason} — {hint}")


def load_image(path: str | os.PathLike, *, max_image_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open, validate and fully decode an image file as RGB.

    The declared size is checked against `max_image_pixels` before any pixel is decoded. Animated
    files give their first frame, EXIF orientation is applied (a corrupt EXIF block is ignored),
    and every mode becomes RGB; transparent areas are composited onto white. The file is closed
    on return. Pillow's own hard cap (2 x Image.MAX_IMAGE_PIXELS) still applies above ours.
    """
    ensure_heif_support()
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise _fail(path, "no such file", "check the path") from None
    except PermissionError:
        raise _fail(path, "permission denied", "fix the file permissions") from None
    except OSError as e:
        raise _fail(path, f"cannot access file ({e.strerror or e})", "check the path") from None
    if p.is_dir():
        raise _fail(path, "is a directory, not an image", "point at an image file")
    if st.st_size == 0:
        raise _fail(path, "empty file (0 bytes)", "re-export or remove it")
    return _decode(p, path, max_image_pixels)


def load_image_bytes(data: bytes, name: str | os.PathLike, *,
                     max_image_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """`load_image` on bytes already read (`name` labels the messages).

    Callers that hash a file and then score it decode these same bytes, so the result is stored
    under the hash of exactly what was decoded, even if the file changes meanwhile.
    """
    ensure_heif_support()
    if not data:
        raise _fail(name, "empty file (0 bytes)", "re-export or remove it")
    return _decode(io.BytesIO(data), name, max_image_pixels)


def load_for_model(data: bytes, name: str | os.PathLike, policy: PixelPolicy, *,
                   max_image_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """`policy.resize(load_image_bytes(data, name))`, decoding no more pixels than it needs.

    A JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg's scaled IDCT), only
    down to `DRAFT_MARGIN` times the model's size per side; the exact bicubic resize follows.
    Every other format (HEIC included, see `_draft`), and a JPEG too small to shrink, decodes as
    `load_image_bytes` does, bit for bit. Errors are the same one-line `ImageError`s as
    `load_image_bytes` followed by `policy.resize`.
    """
    ensure_heif_support()
    if not data:
        raise _fail(name, "empty file (0 bytes)", "re-export or remove it")
    return _decode(io.BytesIO(data), name, max_image_pixels, fit=policy)


# A draft is asked for at 2.5x the model's size per side, so Pillow's antialiased bicubic still
# does at least a 2.5x reduction after the DCT-domain one. Measured on JPEGs (q92) tiled with the
# CC0 photos at their native scale (photo detail everywhere), mean absolute difference from the
# full decode + resize, in grey levels: 4032x3024 at the default policy (-> 728x532, 1/2 scale)
# 0.40, against 1.43 with a draft merely >= the target; 2016x1344 at 56-112 px (1/8 scale)
# 0.29, against 1.05 at a margin of 2; 6000x4000 at the default policy 0.26. The decode+resize
# of a 12-MP photo takes 0.05 s against 0.15 s in full on an idle core (tests/test_decode.py
# checks the <= 1 level bound; bench/library_speed.py times it).
DRAFT_MARGIN = 2.5


def _draft(im: Image.Image, policy: PixelPolicy, path: str | os.PathLike) -> None:
    """Ask a JPEG decoder for a reduced image (libjpeg scales by 1/2, 1/4 or 1/8).

    HEIC is decoded in full: libheif has no reduced decode, and pillow-heif's `draft` picks an
    embedded thumbnail, an image encoded on its own; one 1000 px thumbnail of a 1344x1008 HEIC
    (q90, made by pillow-heif) gave the model's input 2.18 grey levels away from the full decode,
    over the 1-level bound.
    """
    if im.format not in ("JPEG", "MPO"):
        return
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 — broken EXIF: _upright keeps the stored orientation too
        orientation = 1
    sideways = orientation in (5, 6, 7, 8)  # EXIF rotations by 90 degrees swap the sides
    w, h = im.size
    try:
        tw, th = policy.target_size((h, w) if sideways else (w, h), name=str(path))
    except ImageError:
        return  # the resize after the full decode reports it, exactly as load_image does
    if sideways:
        tw, th = th, tw
    im.draft(im.mode, (math.ceil(tw * DRAFT_MARGIN), math.ceil(th * DRAFT_MARGIN)))


def _decode(source, path: str | os.PathLike, max_image_pixels: int,
            fit: PixelPolicy | None = None) -> Image.Image:
    try:
        with Image.open(source) as im:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise _fail(path, f"image has zero size ({w}x{h})", "re-export or remove it")
            if w * h > max_image_pixels:
                raise _too_big(path, w, h, max_image_pixels)
            if fit is not None:
                _draft(im, fit, path)
            # Opening leaves an animated GIF/WebP on frame 0; load() decodes only that frame.
            im.load()
            out = _upright(im)
            out = _to_rgb(out, path)
            if fit is not None:
                out = fit.resize(out, name=str(path))
            if out is im:  # still tied to the file: detach before the file closes
                out = im.copy()
            return out
    except ImageError:
        raise
    except PermissionError:
        raise _fail(path, "permission denied", "fix the file permissions") from None
    except UnidentifiedImageError:
        raise _fail(
            path, "not an image or an unsupported format", "convert it to JPEG/PNG or remove it"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow refused the header before we saw the size; its message carries the count.
        m = re.search(r"\((\d+) pixels\)", str(e))
        count = f"{int(m.group(1)):,} pixels" if m else str(e)
        raise _fail(
            path,
            f"{count} exceeds Pillow's decompression-bomb limit",
            "downscale it first",
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        # Pillow reports truncated/corrupt data as OSError ("image file is truncated"),
        # SyntaxError (bad headers) or EOFError/struct.error (short files).
        raise _fail(path, f"truncated or corrupt image ({e})", "re-export or remove it") from None


def _too_big(path: str | os.PathLike, w: int, h: int, limit: int) -> ImageError:
    return _fail(
        path,
        f"{w}x{h} = {w * h:,} pixels exceeds the {limit:,}-pixel limit (possible decompression "
        "bomb)",
        "downscale it or raise max_image_pixels",
    )


def _upright(im: Image.Image) -> Image.Image:
    """Apply EXIF orientation; phone photos are stored sideways with a rotate tag."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        # Broken EXIF is common in edited/re-saved files; the unrotated pixels are still usable
        # and refusing the whole image over metadata would be worse.
        return im


def _to_rgb(im: Image.Image, path: str | os.PathLike) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode == "I":
        return _gray_array_to_rgb(np.asarray(im), integer=True)
    if mode == "F":
        return _gray_array_to_rgb(np.asarray(im), integer=False)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        return _on_white(im.convert("RGBA"))
    try:
        # CMYK, P, L, 1, YCbCr, HSV: Pillow's converters are fine here.
        return im.convert("RGB")
    except ValueError as e:
        raise _fail(path, f"unsupported colour mode {mode} ({e})", "convert it to RGB") from None


def _on_white(rgba: Image.Image) -> Image.Image:
    # Models never saw alpha; transparent areas on black would read as a dark, broken photo.
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _gray_array_to_rgb(a: np.ndarray, *, integer: bool) -> Image.Image:
    """Map a 16/32-bit integer or float single-channel image onto 0..255."""
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if integer:
        if lo >= 0 and hi <= 255:
            scaled = a  # 8-bit data stored in a wide mode
        elif lo >= 0 and hi <= 65535:
            scaled = a / 257.0  # 16-bit: 65535 -> 255 exactly
        else:
            scaled = _stretch(a, lo, hi)
    elif lo >= 0 and hi <= 1.0:
        scaled = a * 255.0  # the usual float convention
    elif lo >= 0 and hi <= 255:
        scaled = a
    else:
        scaled = _stretch(a, lo, hi)
    g = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    return g.convert("RGB")


def _stretch(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    # Arbitrary ranges (e.g. signed 32-bit, HDR floats): a linear stretch keeps the picture.
    if hi <= lo:
        return np.zeros_like(a)
    return (a - lo) * (255.0 / (hi - lo))


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = PATCH_FACTOR,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2-VL / Qwen2.5-VL's resize rule: (height, width) -> (h, w), both multiples of factor.

    Each side is rounded to the nearest multiple of `factor`; if the area then exceeds
    `max_pixels` (or falls below `min_pixels`) both sides are scaled by the same factor and
    floored (ceiled) to multiples of `factor`, which keeps the aspect ratio as close as the grid
    allows. Raises ValueError for non-positive sides or an aspect ratio above 200.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image sides must be positive, got {height}x{width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {ratio:.0f}:1 exceeds {MAX_ASPECT_RATIO}:1")
    # max(factor, ...) so that a side below factor/2 never rounds to 0.
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class PixelPolicy:
    """How many pixels an image may bring to the model.

    The defaults (128..512 tokens) keep a photo's scoring pass fast on a Mac while leaving enough
    resolution to see noise and blur; Qwen's own defaults allow up to 16384 tokens.
    """

    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 512 * 28 * 28
    factor: int = PATCH_FACTOR

    def __post_init__(self) -> None:
        if self.factor <= 0 or self.min_pixels <= 0 or self.max_pixels < self.min_pixels:
            raise ValueError(
                f"need 0 < min_pixels <= max_pixels and factor > 0, got min_pixels="
                f"{self.min_pixels}, max_pixels={self.max_pixels}, factor={self.factor}"
            )
        if self.max_pixels < self.factor * self.factor:
            raise ValueError(f"max_pixels must allow one {self.factor}x{self.factor} block")

    def target_size(self, size: tuple[int, int], *, name: str | None = None) -> tuple[int, int]:
        """PIL-style (width, height) -> the (width, height) the model will see."""
        w, h = size
        try:
            th, tw = smart_resize(
                h, w, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
            )
        except ValueError:
            label = name or "image"
            if w <= 0 or h <= 0:
                raise ImageError(
                    f"{label}: image has zero size ({w}x{h}) — re-export or remove it"
                ) from None
            ratio = max(w, h) / min(w, h)
            raise ImageError(
                f"{label}: aspect ratio {ratio:.0f}:1 too extreme (the model accepts up to "
                f"{MAX_ASPECT_RATIO}:1) — crop it"
            ) from None
        short, long = sorted((th, tw))
        if long > MAX_ASPECT_RATIO * short:
            # Rounding can push a strip just under 200:1 to just over it (29x5615 -> 28x5628,
            # 201:1), which the processor would then refuse. Trim the long side back to 200:1,
            # or widen the short side by one step if trimming falls under min_pixels.
            trimmed = (short, MAX_ASPECT_RATIO * short)
            widened = (short + self.factor, long)
            fits = self.min_pixels <= trimmed[0] * trimmed[1] <= self.max_pixels
            short, long = trimmed if fits else widened
            th, tw = (short, long) if th < tw else (long, short)
        return tw, th

    def resize(self, img: Image.Image, *, name: str | None = None) -> Image.Image:
        """Resize (bicubic) to the model's grid so its processor never resamples again."""
        label = name or getattr(img, "filename", None) or None
        target = self.target_size(img.size, name=label)
        if target == img.size:
            return img
        return resize_bicubic(img, target)

    def token_count(self, img_size: tuple[int, int]) -> int:
        """LLM image tokens for an image of PIL size (width, height), after `resize`."""
        tw, th = self.target_size(img_size)
        return (th // self.factor) * (tw // self.factor)


def resize_bicubic(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Pillow's bicubic resize to PIL `size` (width, height): the horizontal pass, then the
    vertical one, each rounded to 8 bits — one stated algorithm an app reproduces bit for bit.

    Pillow's two-axis `resize` chooses the order of its passes itself (13.x filters some
    portrait photos vertically first: 30 of 291 photo-sized shrinks, a few levels on some
    values), so the order is fixed here; docs/export.md ("Preparing a photo exactly") states
    the algorithm and the bundles' golden vectors carry the resized pixels' sha256.
    """
    w, h = size
    if img.width != w:
        img = img.resize((w, img.height), Image.Resampling.BICUBIC)
    if img.height != h:
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    return img

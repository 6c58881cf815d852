"""Cheap decoding for the model (`images.load_for_model`): JPEG drafts and HEIC scaled copies
give the model's input within one grey level of the full decode, EXIF orientation is kept, and
everything else is exactly today's `load_image_bytes` + `PixelPolicy.resize`."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from qponder_mlx import images
from qponder_mlx.images import ImageError, PixelPolicy, load_for_model, load_image_bytes

ASSETS = Path(__file__).resolve().parents[1] / "qponder_mlx" / "assets" / "cc0_mini" / "images"
DEFAULT = PixelPolicy()
SMALL = PixelPolicy(min_pixels=56 * 56, max_pixels=112 * 112)


def mosaic(w: int, h: int) -> Image.Image:
    """The CC0 photos tiled at their native scale: photo detail everywhere, unlike an upscale
    (which is smooth and would flatter the draft)."""
    tiles = [Image.open(p).convert("RGB") for p in sorted(ASSETS.iterdir())]
    out = Image.new("RGB", (w, h))
    k = 0
    for y in range(0, h, 224):
        for x in range(0, w, 224):
            out.paste(tiles[k % len(tiles)], (x, y))
            k += 1
    return out


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def today(data: bytes, policy: PixelPolicy) -> Image.Image:
    """The reference: full decode, then the policy's bicubic resize (the path before drafts)."""
    return policy.resize(load_image_bytes(data, "x.jpg"), name="x.jpg")


def mad(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size and a.mode == b.mode == "RGB"
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


@pytest.fixture
def drafts(monkeypatch):
    """Records the size each JPEG draft decoded at."""
    seen: list[tuple[int, int]] = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = real(self, mode, size)
        seen.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return seen


@pytest.fixture(scope="module")
def photo_12mp() -> bytes:
    return jpeg(mosaic(4032, 3024))


def test_12mp_jpeg_drafts_at_half_scale_within_one_grey_level(photo_12mp, drafts):
    out = load_for_model(photo_12mp, "x.jpg", DEFAULT)
    ref = today(photo_12mp, DEFAULT)
    # 728x532 target; 2.5x that is 1820x1330, so libjpeg's 1/2 scale (2016x1512) is the one.
    assert drafts == [(2016, 1512)] and out.size == ref.size == (728, 532)
    assert mad(out, ref) <= 1.0


def test_quarter_and_eighth_scale_drafts_at_a_small_policy(drafts):
    data = jpeg(mosaic(4032, 3024))
    out = load_for_model(data, "x.jpg", SMALL)
    assert drafts == [(504, 378)]  # 1/8 (DC only: an 8x8 box average per pixel)
    assert mad(out, today(data, SMALL)) <= 1.0
    drafts.clear()
    data = jpeg(mosaic(2016, 1512))
    out = load_for_model(data, "x.jpg", SMALL)
    assert drafts == [(504, 378)]  # 1/4: the target 112x84, 2.5 times that 280x210
    assert mad(out, today(data, SMALL)) <= 1.0


def test_exif_rotated_jpeg_is_upright_and_drafted(drafts):
    img = mosaic(2016, 1344)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated by 90 degrees
    data = jpeg(img, exif=exif.tobytes())
    out, ref = load_for_model(data, "x.jpg", SMALL), today(data, SMALL)
    assert out.size == ref.size and out.size[0] < out.size[1]  # portrait, as shown
    assert drafts and drafts[0][0] < 2016  # decoded reduced
    assert mad(out, ref) <= 1.0
    # Independent check of the orientation: the upright full-size image, resized.
    upright = SMALL.resize(img.transpose(Image.Transpose.ROTATE_270))
    assert mad(out, upright) <= 2.0


def test_small_jpeg_and_other_formats_are_exactly_todays(tmp_path):
    small = jpeg(Image.open(ASSETS / "astronaut_jpeg_3.jpg"))
    assert np.array_equal(np.asarray(load_for_model(small, "s.jpg", DEFAULT)),
                          np.asarray(today(small, DEFAULT)))
    buf = io.BytesIO()
    mosaic(900, 700).save(buf, "PNG")
    png = buf.getvalue()
    assert np.array_equal(np.asarray(load_for_model(png, "p.png", SMALL)),
                          np.asarray(today(png, SMALL)))


def test_errors_are_todays_one_line_messages():
    bad = jpeg(mosaic(448, 448))[:600]
    with pytest.raises(ImageError) as a:
        load_for_model(bad, "t.jpg", SMALL)
    with pytest.raises(ImageError) as b:
        today(bad, SMALL)
    assert str(a.value).replace("x.jpg", "t.jpg") == str(b.value).replace("x.jpg", "t.jpg")
    strip = jpeg(Image.new("RGB", (4000, 10), (90, 90, 90)))
    with pytest.raises(ImageError, match="aspect ratio .* crop it"):
        load_for_model(strip, "strip.jpg", SMALL)
    with pytest.raises(ImageError, match="empty file"):
        load_for_model(b"", "e.jpg", SMALL)


def heic(img: Image.Image, thumbnails: list[int]) -> bytes:
    images.ensure_heif_support()
    buf = io.BytesIO()
    try:
        img.save(buf, format="HEIF", quality=90, thumbnails=thumbnails)
    except (KeyError, OSError, ValueError) as e:  # a wheel built without an encoder
        pytest.skip(f"cannot write HEIF here: {e}")
    return buf.getvalue()


def test_heic_decodes_in_full_not_from_its_thumbnail(monkeypatch):
    # A thumbnail big enough for pillow-heif's draft is ignored: it is a separate encode, over
    # the 1-level bound (images._draft), so HEIC input stays exactly today's.
    pytest.importorskip("pillow_heif")
    data = heic(mosaic(448, 336), [300])
    opened: list[tuple[int, int]] = []
    real = images._to_rgb
    monkeypatch.setattr(images, "_to_rgb", lambda im, path: (opened.append(im.size),
                                                             real(im, path))[1])
    out = load_for_model(data, "p.heic", SMALL)
    assert opened == [(448, 336)]
    assert np.array_equal(np.asarray(out),
                          np.asarray(SMALL.resize(load_image_bytes(data, "p.heic"))))

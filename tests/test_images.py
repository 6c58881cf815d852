"""Image loading edge cases and the Qwen2.5-VL resize rule."""

from __future__ import annotations

import io
import math
import os
import sys

import numpy as np
import pytest
from fixtures_labels import make_image, png_with_header
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qponder_mlx import images
from qponder_mlx.images import (
    MAX_IMAGE_PIXELS,
    ImageError,
    PixelPolicy,
    load_image,
    smart_resize,
)

WHITE, BLACK, RED = (255, 255, 255), (0, 0, 0), (255, 0, 0)


def close_to(pixel, expected, tol=8):
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


def assert_one_line_error(exc: pytest.ExceptionInfo, path, *words: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    for w in words:
        assert w in msg, msg


# ---------------------------------------------------------------- loading: modes and metadata


def test_exif_orientation_6_rotates_and_swaps_sides(tmp_path):
    img = Image.new("RGB", (40, 20), RED)
    img.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif, quality=95)

    out = load_image(path)
    assert out.size == (20, 40)
    # Rotating clockwise moves the left (red) half to the top.
    assert close_to(out.getpixel((10, 5)), RED, tol=40)
    assert close_to(out.getpixel((10, 35)), (0, 0, 255), tol=40)


def test_broken_exif_keeps_unrotated_image(tmp_path, monkeypatch):
    path = make_image(tmp_path / "x.jpg", (30, 10))

    def boom(_im):
        raise SyntaxError("corrupt EXIF")

    monkeypatch.setattr(images.ImageOps, "exif_transpose", boom)
    out = load_image(path)
    assert out.size == (30, 10)
    assert out.mode == "RGB"


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_garbage_exif_block_does_not_fail(tmp_path):
    path = tmp_path / "x.jpg"
    Image.new("RGB", (30, 10), RED).save(path, exif=b"Exif\x00\x00MM\x00*garbage")
    out = load_image(path)
    assert out.size == (30, 10)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    out = load_image(path)
    assert out.mode == "RGB"
    assert close_to(out.getpixel((8, 8)), RED)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 65535, 128 * 257, 1000]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")  # the file really is 16-bit
    out = load_image(path)
    assert out.mode == "RGB"
    # 65535 -> 255 and 32896 -> 128: a clipping converter would give 255 for both.
    assert [out.getpixel((x, 0)) for x in range(4)] == [
        (0, 0, 0),
        (255, 255, 255),
        (128, 128, 128),
        (4, 4, 4),
    ]


def test_32bit_integer_tiff_in_8bit_range_is_kept(tmp_path):
    arr = np.array([[0, 100, 255]], dtype=np.int32)
    path = tmp_path / "wide.tif"
    Image.fromarray(arr, mode="I").save(path)
    out = load_image(path)
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_float_image_in_unit_range_is_scaled_to_255(tmp_path):
    arr = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    path = tmp_path / "float.tif"
    Image.fromarray(arr, mode="F").save(path)
    out = load_image(path)
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 64, 255]


def test_float_image_with_odd_range_is_stretched(tmp_path):
    arr = np.array([[-10.0, 0.0, 1000.0]], dtype=np.float32)
    path = tmp_path / "hdr.tif"
    Image.fromarray(arr, mode="F").save(path)
    out = load_image(path)
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 3, 255]


def test_grayscale_alpha_is_composited_on_white(tmp_path):
    img = Image.new("LA", (2, 1))
    img.putpixel((0, 0), (0, 0))  # black, fully transparent
    img.putpixel((1, 0), (0, 255))  # black, opaque
    path = tmp_path / "la.png"
    img.save(path)
    out = load_image(path)
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == BLACK


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 0)  # index 0: declared transparent
    img.putpixel((1, 0), 1)  # red
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    out = load_image(path)
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == RED


def test_rgba_half_transparent_blends_toward_white(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 128)).save(path)
    r, g, b = load_image(path).getpixel((1, 1))
    assert r == g == b and 125 <= r <= 129


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((4, 4)) == RED


def test_heic_opens_via_pillow_heif(tmp_path):
    pytest.importorskip("pillow_heif")
    buf = io.BytesIO()
    images.ensure_heif_support()
    try:
        Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="HEIF")
    except (KeyError, OSError, ValueError) as e:  # wheel built without an encoder
        pytest.skip(f"cannot write HEIF here: {e}")
    path = tmp_path / "phone.heic"
    path.write_bytes(buf.getvalue())
    out = load_image(path)
    assert out.size == (16, 16)
    assert close_to(out.getpixel((8, 8)), (200, 10, 10), tol=12)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")
def test_no_file_handles_leak(tmp_path):
    good = make_image(tmp_path / "ok.png")
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(30):
        load_image(good)
        with pytest.raises(ImageError):
            load_image(bad)
    assert len(os.listdir("/proc/self/fd")) <= before


def test_returned_image_is_detached_from_the_file(tmp_path):
    path = make_image(tmp_path / "ok.png", (5, 7))
    out = load_image(path)
    path.unlink()
    assert out.size == (5, 7)
    assert out.getpixel((2, 2)) == (120, 60, 30)


# ---------------------------------------------------------------- loading: errors


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    full = tmp_path / "full.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    path = tmp_path / "photo.jpg"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert_one_line_error(exc, path, "truncated or corrupt", "re-export or remove it")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert_one_line_error(exc, path, "empty file")


def test_text_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, I am not a JPEG\n")
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert_one_line_error(exc, path, "not an image")


def test_missing_file(tmp_path):
    path = tmp_path / "gone.png"
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert_one_line_error(exc, path, "no such file")


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageError) as exc:
        load_image(tmp_path)
    assert_one_line_error(exc, tmp_path, "is a directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied_for_real(tmp_path):
    path = make_image(tmp_path / "secret.png")
    path.chmod(0)
    try:
        with pytest.raises(ImageError) as exc:
            load_image(path)
    finally:
        path.chmod(0o644)
    assert_one_line_error(exc, path, "permission denied")


def test_permission_denied_is_reported(tmp_path, monkeypatch):
    # Runs as root too: simulate the OS refusing the open.
    path = make_image(tmp_path / "secret.png")

    def refuse(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images.Image, "open", refuse)
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert_one_line_error(exc, path, "permission denied")


def test_bomb_header_is_refused_before_decoding(tmp_path):
    # 9000x9000 = 81 Mpx: over our 80 Mpx guard, under Pillow's own. The pixel data is a few
    # bytes, so reaching the decoder would give "truncated", not the size error.
    path = png_with_header(tmp_path / "bomb.png", 9000, 9000)
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert_one_line_error(exc, path, "9000x9000", "81,000,000 pixels", "80,000,000")
    assert MAX_IMAGE_PIXELS == 80_000_000


def test_huge_bomb_refused_by_pillow_is_reported_with_size(tmp_path):
    path = png_with_header(tmp_path / "huge.png", 100_000, 100_000)
    with pytest.raises(ImageError) as exc:
        load_image(path, max_image_pixels=10**12)
    assert_one_line_error(exc, path, "10,000,000,000 pixels", "decompression-bomb")


def test_custom_pixel_guard(tmp_path):
    path = make_image(tmp_path / "ok.png", (100, 100))
    with pytest.raises(ImageError) as exc:
        load_image(path, max_image_pixels=5_000)
    assert_one_line_error(exc, path, "100x100", "5,000-pixel limit")
    assert load_image(path, max_image_pixels=10_000).size == (100, 100)


def test_zero_width_png_header(tmp_path):
    path = png_with_header(tmp_path / "flat.png", 0, 10)
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert_one_line_error(exc, path)


# ---------------------------------------------------------------- smart_resize and PixelPolicy


def test_smart_resize_hand_computed():
    # Already on the grid and inside Qwen's default budget: unchanged.
    assert smart_resize(224, 224) == (224, 224)
    # 1000x2000 rounds to 1008x1988 = 2,003,904 px > 512*784 = 401,408, so
    # beta = sqrt(2,000,000 / 401,408) = 1/0.448 and the sides become
    # floor(1000*0.448/28)*28 = 16*28 = 448 and floor(2000*0.448/28)*28 = 32*28 = 896.
    assert smart_resize(1000, 2000, max_pixels=512 * 28 * 28) == (448, 896)
    # 1x1 rounds up to 28x28 = 784 px < 128*784, so beta = sqrt(100,352) = 316.78 and
    # each side becomes ceil(316.78/28)*28 = 12*28 = 336.
    assert smart_resize(1, 1, min_pixels=128 * 784, max_pixels=512 * 784) == (336, 336)
    # 490/28 = 17.5 rounds half to even -> 18 (Python round, as in Qwen's code): 504.
    assert smart_resize(490, 700) == (504, 700)


def test_smart_resize_rejects_extreme_aspect_ratio_with_plain_valueerror():
    with pytest.raises(ValueError, match="aspect ratio 1000:1") as exc:
        smart_resize(20, 20000)
    assert not isinstance(exc.value, ImageError)
    assert smart_resize(10, 2000)  # exactly 200:1 is allowed
    with pytest.raises(ValueError):
        smart_resize(0, 10)


def test_smart_resize_matches_transformers_qwen2vl():
    mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    ref = mod.smart_resize
    budgets = [(4 * 784, 16384 * 784), (128 * 784, 512 * 784), (256 * 784, 1280 * 784)]
    sides = [15, 27, 28, 29, 41, 100, 224, 333, 480, 640, 768, 1000, 1024, 1080, 1920, 4032]
    for lo, hi in budgets:
        for h in sides:
            for w in sides:
                if max(h, w) / min(h, w) > 200:
                    continue
                ours = smart_resize(h, w, min_pixels=lo, max_pixels=hi)
                assert ours == ref(h, w, min_pixels=lo, max_pixels=hi), (h, w, lo, hi)
    # Below 15 px the rules differ on purpose: HF lets a side round to 0 and then upsizes,
    # we (like qwen-vl-utils) clamp it to 28 first. Either way HF's processor keeps our output.
    assert smart_resize(14, 100) == (28, 112) != ref(14, 100) == (28, 168)
    for h, w in [(14, 100), (1, 1), (3, 500), (10, 1999)]:
        th, tw = smart_resize(h, w)
        assert ref(th, tw) == (th, tw)


@settings(max_examples=300, deadline=None)
@given(
    h=st.integers(1, 12000),
    w=st.integers(1, 12000),
    budget=st.sampled_from([(128, 512), (4, 16384), (256, 1280)]),
)
def test_policy_output_is_a_fixed_point_of_the_processor_rule(h, w, budget):
    if max(h, w) / min(h, w) > 200:
        return
    policy = PixelPolicy(budget[0] * 784, budget[1] * 784)
    tw, th = policy.target_size((w, h))
    assert th % 28 == 0 and tw % 28 == 0
    assert th * tw <= policy.max_pixels or min(th, tw) == 28
    # What the processor does with our output: nothing.
    again = smart_resize(th, tw, min_pixels=policy.min_pixels, max_pixels=policy.max_pixels)
    assert again == (th, tw)
    # Aspect ratio stays close (grid rounding costs at most one 28 px step per side).
    assert math.isclose(tw / th, w / h, rel_tol=0.5) or min(th, tw) == 28


def test_near_limit_strips_stay_acceptable_to_the_processor():
    # Qwen's rounding turns 5615x29 (193.6:1) into 5628x28 (201:1), which the processor itself
    # would refuse; the policy trims such outputs back to 200:1 (or widens the short side).
    assert smart_resize(29, 5615, min_pixels=128 * 784, max_pixels=512 * 784) == (28, 5628)
    assert PixelPolicy().target_size((5615, 29)) == (5600, 28)
    for lo, hi in [(128, 512), (4, 16384), (256, 1280)]:
        policy = PixelPolicy(lo * 784, hi * 784)
        for short in range(1, 48):
            for long in range(195 * short, 200 * short + 1):
                tw, th = policy.target_size((long, short))
                again = smart_resize(th, tw, min_pixels=lo * 784, max_pixels=hi * 784)
                assert again == (th, tw), (long, short, lo, hi)


def test_policy_resize_and_token_count():
    policy = PixelPolicy()
    assert (policy.min_pixels, policy.max_pixels) == (128 * 784, 512 * 784)
    # 1024x768 photo -> 728x532 (hand: beta = sqrt(786432/401408) = 1.3997;
    # floor(768/1.3997/28) = 19, floor(1024/1.3997/28) = 26) -> 19*26 tokens.
    out = policy.resize(Image.new("RGB", (1024, 768)))
    assert out.size == (728, 532)
    assert policy.token_count((1024, 768)) == 19 * 26 == 494
    assert policy.token_count(out.size) == 494


def test_policy_resize_is_noop_on_grid():
    img = Image.new("RGB", (448, 336))
    assert PixelPolicy().resize(img) is img


def test_one_pixel_image_resizes_up(tmp_path):
    path = make_image(tmp_path / "dot.png", (1, 1), (10, 200, 30))
    img = load_image(path)
    out = PixelPolicy().resize(img)
    assert out.size == (336, 336)
    assert out.getpixel((100, 100)) == (10, 200, 30)
    assert PixelPolicy().token_count((1, 1)) == 12 * 12


def test_thin_strip_loads_but_resize_refuses(tmp_path):
    path = make_image(tmp_path / "strip.png", (20000, 20))
    img = load_image(path)
    assert img.size == (20000, 20)
    with pytest.raises(ImageError) as exc:
        PixelPolicy().resize(img, name="strip.png")
    msg = str(exc.value)
    assert msg.startswith("strip.png: aspect ratio 1000:1 too extreme")
    assert "\n" not in msg
    with pytest.raises(ImageError, match="1000:1"):
        PixelPolicy().token_count((20, 20000))


def test_policy_rejects_inconsistent_budget():
    with pytest.raises(ValueError):
        PixelPolicy(min_pixels=1000, max_pixels=10)

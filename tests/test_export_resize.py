"""The resize an app must reproduce: the documented algorithm equals Pillow's bicubic, and the
resize-parity measurement compares the other resamplers against it."""

import numpy as np
import pytest
from PIL import Image
from qponder_mlx.export import pillow_bicubic, resize_parity
from qponder_mlx.export.golden import ASSETS, GOLDEN_IMAGES

from qponder_mlx.images import PixelPolicy, load_image

BICUBIC = Image.Resampling.BICUBIC


def test_each_pass_equals_pillow_on_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 160, 2))
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out_w, out_h = (int(v) for v in rng.integers(1, 220, 2))
        img = Image.fromarray(rgb)
        # Pillow's two passes done one at a time: horizontal, then vertical.
        want = np.asarray(img.resize((out_w, h), BICUBIC).resize((out_w, out_h), BICUBIC))
        np.testing.assert_array_equal(pillow_bicubic.resize(rgb, out_w, out_h), want)
    # a phone photo's shrink factor (3000 -> 84: 36-fold, 147 taps)
    row = rng.integers(0, 256, (2, 3000, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(row).resize((84, 2), BICUBIC))
    np.testing.assert_array_equal(pillow_bicubic.resize(row, 84, 2), want)


@pytest.mark.parametrize("policy", [PixelPolicy(), PixelPolicy(min_pixels=56 * 56,
                                                                max_pixels=112 * 112)])
def test_the_port_equals_qponders_resize_on_the_golden_photos(policy):
    for name in GOLDEN_IMAGES:
        img = load_image(ASSETS / name)
        for crop in (None, (0, 0, 224, 150), (0, 0, 150, 224)):
            im = img.crop(crop) if crop else img
            want = np.asarray(policy.resize(im))
            got = pillow_bicubic.resize(np.asarray(im), want.shape[1], want.shape[0])
            np.testing.assert_array_equal(got, want)


def test_fixed_point_weights_sum_to_one_and_antialias_when_shrinking():
    for n_in, n_out in ((224, 112), (224, 336), (97, 13)):
        lo, k = pillow_bicubic.axis_coefficients(n_in, n_out)
        assert np.all(np.abs(k.sum(axis=1) - (1 << 22)) <= k.shape[1])
        assert np.all(lo >= 0) and np.all(lo <= n_in - 1)
        taps = (k != 0).sum(axis=1).max()
        # bicubic support 2 px at scale 1, widened by the shrink factor
        assert taps <= 2 * 2 * max(n_in / n_out, 1) + 2


def test_linear_light_resize_keeps_flat_colours_and_differs_on_edges():
    flat = Image.new("RGB", (64, 48), (200, 30, 90))
    out = resize_parity.resize_linear_light(flat, (28, 28))
    assert np.all(np.asarray(out) == np.array([200, 30, 90]))
    v = np.linspace(0, 1, 256)
    np.testing.assert_allclose(resize_parity.linear_to_srgb(resize_parity.srgb_to_linear(v)), v,
                               atol=1e-12)
    edge = Image.fromarray(np.repeat(np.repeat(np.eye(2, dtype=np.uint8) * 255, 32, 0), 32, 1))
    a = np.asarray(resize_parity.resize_linear_light(edge.convert("RGB"), (7, 7)), float)
    b = np.asarray(edge.convert("RGB").resize((7, 7), BICUBIC), float)
    assert a[3, 3, 0] > b[3, 3, 0] + 20  # averaging light, not code values, is brighter


def test_measure_compares_every_way_with_the_reference(tiny_loaded, cc0_labels):
    images = sorted((cc0_labels.parent / "images").iterdir())[:3]
    rep = resize_parity.measure(tiny_loaded, images, PixelPolicy(min_pixels=56 * 56,
                                                                 max_pixels=56 * 56))
    ref = rep["methods"]["pil_bicubic_gamma"]
    assert (ref["mean_abs_delta"], ref["max_abs_delta"], ref["srcc_vs_reference"]) == (0, 0, 1)
    for name in ("bicubic_linear_light", "lanczos", "bilinear"):
        r = rep["methods"][name]
        assert r["mean_abs_pixel_delta"] > 0 and r["max_abs_delta"] >= r["mean_abs_delta"]
    assert len(resize_parity.table_lines(rep)) == 2 + 4


def test_measure_leaves_out_an_image_that_does_not_load(tiny_loaded, cc0_labels, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    images = sorted((cc0_labels.parent / "images").iterdir())[:2]
    rep = resize_parity.measure(tiny_loaded, [images[0], bad, images[1]],
                                PixelPolicy(min_pixels=56 * 56, max_pixels=56 * 56),
                                mos=[4.0, 3.0, 2.0])
    assert (rep["images"], rep["skipped"]) == (2, 1)
    assert rep["methods"]["pil_bicubic_gamma"]["srcc_vs_mos"] in (-1.0, 1.0)


def test_the_port_equals_qponders_resize_on_portrait_shrinks_and_mixed_rounding():
    # Sizes where Pillow 13's two-axis resize filters vertically first: a 1:2 portrait shrink,
    # and one side rounded up while the other is rounded down (495 -> 504, 340 -> 336).
    photo = load_image(ASSETS / GOLDEN_IMAGES[0])
    for size in ((872, 1727), (495, 340)):
        im = photo.resize(size, Image.Resampling.BILINEAR)
        want = np.asarray(PixelPolicy().resize(im))
        got = pillow_bicubic.resize(np.asarray(im), want.shape[1], want.shape[0])
        np.testing.assert_array_equal(got, want)

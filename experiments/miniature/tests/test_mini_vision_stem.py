"""The DCT-energy vision stem (`vision_stem`) against an independent DCT (scipy)."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from scipy.fft import dctn
from synth import center_crop, distort
from vision_stem import (
    BLOCK_GAIN,
    BOUNDARY,
    CONST,
    INTERIOR,
    LOG_CENTRE,
    LOG_RAMPS,
    N_AC,
    N_BANDS,
    N_FEAT,
    POOL_SHARPNESS,
    POOLS,
    SOFTABS_GAIN,
    STEM_HIDDEN,
    TEXTURE_BANDS,
    ac_frequencies,
    build_student,
    grid_pairs,
    stem_layout,
)

import qponder_mlx

H = STEM_HIDDEN


@pytest.fixture(scope="module")
def stem_model(tmp_path_factory):
    from mlx_vlm import load

    path = build_student(tmp_path_factory.mktemp("stem") / "m", hidden_size=64,
                         vision_hidden=H, vision_depth=3, vision_stem="dct")
    model, processor = load(str(path))
    return model, processor


def _photo(size: int = 112) -> Image.Image:
    assets = Path(qponder_mlx.__file__).parent / "assets" / "cc0_mini"
    first = sorted(p for p in assets.rglob("*") if p.suffix.lower() in (".jpg", ".png"))[0]
    return center_crop(Image.open(first).convert("RGB"), size)


def _pixels(processor, img: Image.Image):
    out = processor.image_processor(images=[img], return_tensors="np")
    return mx.array(out["pixel_values"]), mx.array(out["image_grid_thw"])


def _residual_after(model, pv, grid, blocks: int) -> np.ndarray:
    """The vision residual stream after `blocks` blocks, in the processor's patch order."""
    vt = model.vision_tower
    x = vt.patch_embed(pv)
    rot = vt.rot_pos_emb(grid)
    cu = mx.array([0, x.shape[0]], dtype=mx.int32)
    for blk in vt.blocks[:blocks]:
        x = blk(x, cu_seqlens=cu, rotary_pos_emb=rot)
    return np.array(x)


def _luma_patches(img: Image.Image) -> np.ndarray:
    """14x14 luma patches in Qwen's processor order (2x2 merge windows, row-major)."""
    y = np.asarray(img, np.float64) / 255.0 @ np.array([0.299, 0.587, 0.114])
    g = y.shape[0] // 14
    p = y.reshape(g // 2, 2, 14, g // 2, 2, 14).transpose(0, 3, 1, 4, 2, 5)
    return p.reshape(-1, 14, 14)


def test_patch_embedding_is_the_luma_dct(stem_model):
    model, processor = stem_model
    img = _photo()
    x = _residual_after(model, *_pixels(processor, img), blocks=0)
    ref = np.stack([dctn(p, norm="ortho") for p in _luma_patches(img)])
    want = np.stack([ref[:, u, v] for u, v in ac_frequencies()], 1)
    assert x.shape == (64, H)
    np.testing.assert_allclose(x[:, :N_AC], want, atol=2e-4)  # float32 + processor rounding
    assert np.abs(x[:, N_AC:]).max() == 0.0                    # nothing else yet


def test_block0_writes_band_soft_abs_and_a_constant(stem_model):
    model, processor = stem_model
    img = _photo()
    x0 = _residual_after(model, *_pixels(processor, img), blocks=0)
    x1 = _residual_after(model, *_pixels(processor, img), blocks=1)
    lay = stem_layout(H)
    c = x0[:, :N_AC]
    rms = np.sqrt((np.sum(c ** 2, 1, keepdims=True) + CONST ** 2) / H + 1e-6)
    z = SOFTABS_GAIN * c / rms
    up = CONST / rms / np.sqrt(H)              # the constant channel read by up_proj (≈ 1)
    soft = z * np.tanh(z / 2) * up               # (silu(z) + silu(-z)) * up, written differently
    gain = SOFTABS_GAIN * np.sqrt(H) / CONST
    freqs = ac_frequencies()
    want = np.zeros((len(c), N_BANDS))
    for k, (u, v) in enumerate(freqs):
        n = sum(1 for f in freqs if sum(f) == u + v)
        want[:, u + v - 1] += (u + v) * soft[:, k] / (gain * n)
    np.testing.assert_allclose(x1[:, lay["bands"]:lay["bands"] + N_BANDS], want,
                               rtol=1e-3, atol=1e-5)
    assert np.allclose(x1[:, lay["const"]], CONST)
    np.testing.assert_allclose(x1[:, :N_AC], c, atol=1e-6)      # coefficients pass unchanged


def test_block0_blockiness_pair_is_the_soft_abs_of_pixel_differences(stem_model):
    """Reference from the pixels themselves (not from DCT coefficients): the mean soft |·| of
    neighbour differences over boundary-capable and interior pairs, both axes."""
    model, processor = stem_model
    img = _photo()
    x0 = _residual_after(model, *_pixels(processor, img), blocks=0)
    x1 = _residual_after(model, *_pixels(processor, img), blocks=1)
    lay = stem_layout(H)
    rms = np.sqrt((np.sum(x0[:, :N_AC] ** 2, 1) + CONST ** 2) / H + 1e-6)[:, None]
    y = _luma_patches(img)
    boundary, interior = grid_pairs()
    for feat, pairs in ((BOUNDARY, boundary), (INTERIOR, interior)):
        diffs = np.concatenate([np.stack([y[:, :, a] - y[:, :, b] for a, b in pairs], -1)
                                .reshape(len(y), -1),
                                np.stack([y[:, a, :] - y[:, b, :] for a, b in pairs], -1)
                                .reshape(len(y), -1)], 1)
        z = SOFTABS_GAIN * diffs / rms
        up = CONST / rms / np.sqrt(H)
        want = (z * np.tanh(z / 2) * up).mean(1) / (SOFTABS_GAIN * np.sqrt(H) / CONST)
        np.testing.assert_allclose(x1[:, lay["bands"] + feat], want, rtol=2e-3, atol=1e-6)
    # the pairs: every 8-px boundary of a patch at 14*i is an (odd, even) pair, never (even, odd)
    for i in range(8):
        cuts = {8 * m - 14 * i for m in range(64)} & set(range(1, 14))
        assert {(c - 1, c) for c in cuts} <= set(boundary)
        assert not {(c - 1, c) for c in cuts} & set(interior)


def test_blockiness_rises_with_jpeg_level_only(stem_model):
    model, processor = stem_model
    lay = stem_layout(H)
    img = _photo()

    def ratio(im):
        x = _residual_after(model, *_pixels(processor, im), blocks=3)[0]
        return x[lay["global"] + BOUNDARY] / BLOCK_GAIN  # log4(B / I)

    jpeg = [ratio(distort(img, "jpeg", level)) for level in range(1, 6)]
    assert jpeg[4] > jpeg[2] > jpeg[0] > ratio(img) - 0.02, jpeg
    assert jpeg[4] - ratio(img) > 0.2
    for kind in ("blur", "noise"):
        assert abs(ratio(distort(img, kind, 5)) - ratio(img)) < 0.5 * (jpeg[4] - ratio(img))


def test_block1_log_stage_is_log4_of_the_band_amplitude(stem_model):
    model, _ = stem_model
    lay = stem_layout(H)
    blk = model.vision_tower.blocks[1]
    amps = np.geomspace(LOG_RAMPS[0] * 2, LOG_RAMPS[-1] * 2, 40)
    x = np.zeros((len(amps), H), np.float32)
    x[:, lay["bands"] + 5] = amps
    x[:, lay["const"]] = CONST
    out = np.array(blk.mlp(blk.norm2(mx.array(x))))[:, lay["log"] + 5]
    assert np.all(np.diff(out) > 0)                                   # monotone
    slope = np.polyfit(np.log(amps) / np.log(4), out, 1)[0]
    assert slope == pytest.approx(1.0, abs=0.1)                       # one unit per factor 4
    resid = out - np.polyval(np.polyfit(np.log(amps), out, 1), np.log(amps))
    assert np.abs(resid).max() < 0.15


def test_block2_pools_the_log_bands_over_the_most_and_least_textured_patches(stem_model):
    """Reference: softmax over patches of ±sharpness x the patch's mean low-band log (as block 2's
    norm1 sees it), applied to every log channel; computed here in numpy."""
    model, processor = stem_model
    lay = stem_layout(H)
    px = _pixels(processor, _photo())
    x2, x3 = (_residual_after(model, *px, blocks=b) for b in (2, 3))
    gain = np.sqrt(H) / CONST                          # norm1's gain on the log channels
    n = x2 / np.sqrt((x2 ** 2).mean(1, keepdims=True) + 1e-6)
    logs = n[:, lay["log"]:lay["log"] + N_FEAT] / gain  # ≈ the log4 amplitudes per patch
    texture = logs[:, :TEXTURE_BANDS].mean(1)
    assert texture.std() > 0.1                          # patches differ in content
    pooled_texture = []
    for p_i, sign in enumerate(POOLS):
        a = np.exp(sign * POOL_SHARPNESS * (texture - texture.max()))
        a /= a.sum()
        want = a @ logs - LOG_CENTRE                    # centred, and blockiness as
        want[BOUNDARY] = BLOCK_GAIN * (a @ logs[:, BOUNDARY] - a @ logs[:, INTERIOR])  # a log ratio
        glob = x3[:, lay["global"] + p_i * N_FEAT:lay["global"] + (p_i + 1) * N_FEAT]
        # every patch gets the same pooled vector (the attention is position-free)
        np.testing.assert_allclose(glob, np.broadcast_to(want, glob.shape), rtol=1e-3, atol=2e-4)
        pooled_texture.append(a @ texture)
    # a soft max and a soft min: between the extremes, on either side of the mean
    assert texture.max() >= pooled_texture[0] > texture.mean() + 0.1
    assert texture.min() <= pooled_texture[1] < texture.mean() - 0.1
    # and the merger reads nothing else: its 16 image tokens are one vector up to ln_q's per-patch
    # scale (a few %)
    feats = np.array(model.vision_tower(*px))
    assert feats.shape[0] == 16 and np.abs(feats - feats[0]).max() < 0.1 * np.abs(feats).max()


@pytest.mark.parametrize("kind", ["blur", "noise"])
def test_stem_sees_blur_and_noise_levels(stem_model, kind):
    """The mean log band amplitude falls with blur and rises with noise, level by level."""
    model, processor = stem_model
    lay = stem_layout(H)
    img = _photo()
    top = []
    for level in range(1, 6):
        x = _residual_after(model, *_pixels(processor, distort(img, kind, level)), blocks=3)
        top.append(x[0, lay["global"]:lay["global"] + N_BANDS].mean())
    steps = np.diff(top)
    assert np.all(steps < 0) if kind == "blur" else np.all(steps > 0), top


def test_stem_refuses_sizes_it_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="vision hidden size"):
        build_student(tmp_path / "m", vision_hidden=128, vision_depth=3, vision_stem="dct")
    with pytest.raises(ValueError, match="depth >= 3"):
        build_student(tmp_path / "m", vision_hidden=H, vision_depth=2, vision_stem="dct")
    with pytest.raises(ValueError, match="vision_stem"):
        build_student(tmp_path / "m", vision_stem="pretrained")

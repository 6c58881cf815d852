"""Whitening of the image tokens (stem_whitening): the transform against the
textbook ZCA formula, and the rewritten merger against that transform applied by hand."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from stem_whitening import (
    RECORD,
    WhiteningError,
    image_token_means,
    images_of,
    whiten_merger,
    whitening,
)
from synth import center_crop, load_cc0_photo, write_set
from vision_stem import STEM_HIDDEN, build_student
from whiten_stem import main as whiten_stem


def _correlated(n: int, d: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(rank, d)) * np.geomspace(5.0, 0.1, rank)[:, None]
    return rng.normal(size=(n, rank)) @ mix + rng.normal(size=d)


def test_full_rank_whitening_is_zca_scaled_to_the_same_total_variance():
    x = _correlated(400, 6, 6)
    t, mu, k = whitening(x, rel=0.0)
    cov = np.cov(x, rowvar=False, bias=True)
    sigma2 = np.trace(cov) / 6  # total variance kept, spread evenly over the 6 directions
    zca = np.sqrt(sigma2) * np.real(scipy.linalg.sqrtm(np.linalg.inv(cov)))
    assert k == 6
    np.testing.assert_allclose(t, zca, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(mu, x.mean(0))
    y = (x - mu) @ t.T + mu
    np.testing.assert_allclose(np.cov(y, rowvar=False, bias=True), sigma2 * np.eye(6), atol=1e-9)
    np.testing.assert_allclose(y.mean(0), x.mean(0), atol=1e-9)


def test_weak_directions_are_dropped_and_the_kept_ones_equalised():
    rng = np.random.default_rng(1)
    x = _correlated(500, 8, 3) + 1e-6 * rng.normal(size=(500, 8))  # 3 real directions + dust
    t, mu, k = whitening(x, rel=1e-3)
    assert k == 3
    y = (x - mu) @ t.T
    ev = np.sort(np.linalg.eigvalsh(np.cov(y, rowvar=False, bias=True)))[::-1]
    total = np.trace(np.cov(x, rowvar=False, bias=True))
    np.testing.assert_allclose(ev[:3], total / 3, rtol=1e-6)  # equal, and the total is kept
    assert ev[3:].max() < 1e-12 * total


def test_constant_or_single_features_are_refused():
    with pytest.raises(WhiteningError, match="do not vary"):
        whitening(np.ones((5, 4)))
    with pytest.raises(WhiteningError, match="n >= 2"):
        whitening(np.ones((1, 4)))


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("whiten_set")
    photo = center_crop(load_cc0_photo("camera"), 56)
    write_set(out, {"camera": photo}, split={"camera": "train"})
    return out / "train.jsonl"


def test_whitened_merger_gives_the_tokens_the_transform_predicts(tmp_path, image_set):
    model = build_student(tmp_path / "m", hidden_size=32, vision_hidden=STEM_HIDDEN,
                          vision_depth=3, vision_stem="dct")
    images = images_of(image_set)
    before = image_token_means(model, images)
    t, mu, k = whitening(before)
    record = whiten_merger(model, images)
    assert record == {"layer": "vision_tower.merger.mlp.2", "images": 15, "rel": 0.01,
                      "directions": k, "hidden": 32}
    after = image_token_means(model, images)
    # The rewritten layer is affine in the merger's hidden state, so each image's mean token
    # moves exactly as the transform fitted to the old tokens says (float32 weights).
    np.testing.assert_allclose(after, (before - mu) @ t.T + mu, atol=2e-5)
    ev = np.sort(np.linalg.eigvalsh(np.cov(after, rowvar=False, bias=True)))[::-1]
    np.testing.assert_allclose(ev[:k], ev[0], rtol=1e-2)  # every kept direction equally strong
    assert ev[0] > 10 * np.sort(np.linalg.eigvalsh(np.cov(before, rowvar=False, bias=True)))[-k]
    with pytest.raises(WhiteningError, match="already whitened"):
        whiten_merger(model, images)


def test_cli_whitens_once_and_names_the_problem(tmp_path, image_set, capsys):
    model = build_student(tmp_path / "m", hidden_size=32, vision_hidden=STEM_HIDDEN,
                          vision_depth=3, vision_stem="dct")
    assert whiten_stem([str(model), "--data", str(image_set)]) == 0
    assert "whitened over 15 images" in capsys.readouterr().out and (model / RECORD).exists()
    assert whiten_stem([str(model), "--data", str(image_set)]) == 2
    assert "already whitened" in capsys.readouterr().err
    assert whiten_stem([str(tmp_path / "m2"), "--data", str(image_set)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is missing" in err and len(err.strip().splitlines()) == 1

"""Fast mode reads the answer as the model would write it: leading digit, then the first decimal."""

import numpy as np
from PIL import Image

from qponder_mlx.images import PixelPolicy
from qponder_mlx.readout import digits_value
from qponder_mlx.scoring import ScoreConfig, Scorer
from qponder_mlx.testing.sft_sets import CC0_IMAGES
from qponder_mlx.testing.stock_reference import stock_fast_score

PIXELS = PixelPolicy(56 * 56, 112 * 112)


def test_fast_scores_equal_stock_mlx_vlm_read_with_the_first_decimal(tiny_loaded):
    """Three photos, two of one size (one batch) and one of another: the batched, prefix-cached
    score equals two plain stock forward passes per photo (prompt, then prompt + "d.")."""
    scorer = Scorer(tiny_loaded, ScoreConfig(mode="fast", pixels=PIXELS, batch_size=2))
    paths = sorted(CC0_IMAGES.iterdir())[:3]
    imgs = [Image.open(p).convert("RGB").resize((112, 84)) for p in paths[:2]]
    imgs.append(Image.open(paths[2]).convert("RGB").resize((84, 112)))
    ours = [r.score for r in scorer.score(imgs)]
    ref = [stock_fast_score(tiny_loaded.model, tiny_loaded.processor, scorer.prompt,
                            PIXELS.resize(im), scorer.watch_ids, scorer.dot_id) for im in imgs]
    np.testing.assert_allclose(ours, [r[0] for r in ref], atol=1e-4)
    # the decimal moves the score (else this proves nothing about it): a random model's first
    # decimal is spread over 0..9, worth ~0.45
    assert min(full - lead for full, lead in ref) > 0.1


def test_decimal_read_by_hand():
    """p(3) = 1 and the decimal 7 with certainty read 3.7; a split decimal reads its mean."""
    lead = np.array([[0, 0, 1.0, 0, 0]])
    assert digits_value(lead, [np.eye(10)[[7]]])[0] == 3.7
    half = np.zeros((1, 10))
    half[0, [2, 8]] = 0.5
    assert abs(digits_value(lead, [half])[0] - 3.5) < 1e-12
    assert digits_value(np.array([[0, 0, 0, 0, 1.0]]), [np.eye(10)[[9]]])[0] == 5.0  # clipped


def test_fast_identity_says_the_read_changed(tiny_loaded):
    """Fast scores stored with the leading-digit read are not reused (the store keys on this)."""
    fast = Scorer(tiny_loaded, ScoreConfig(mode="fast", pixels=PIXELS))
    assert fast.identity.endswith(":decimal") and ":fast:" in fast.identity

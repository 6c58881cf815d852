"""Fast mode reads the expected leading digit after `<think></think><answer>`."""

import numpy as np
from PIL import Image

from qponder_mlx.images import PixelPolicy
from qponder_mlx.scoring import ScoreConfig, Scorer
from qponder_mlx.testing.sft_sets import CC0_IMAGES
from qponder_mlx.testing.stock_reference import stock_fast_score

PIXELS = PixelPolicy(56 * 56, 112 * 112)


def test_fast_scores_equal_the_expectation_from_stock_mlx_vlm_logits(tiny_loaded):
    """Three photos, two of one size (one batch) and one of another: the batched, prefix-cached
    score equals a plain stock forward pass per photo."""
    scorer = Scorer(tiny_loaded, ScoreConfig(mode="fast", pixels=PIXELS, batch_size=2))
    paths = sorted(CC0_IMAGES.iterdir())[:3]
    imgs = [Image.open(p).convert("RGB").resize((112, 84)) for p in paths[:2]]
    imgs.append(Image.open(paths[2]).convert("RGB").resize((84, 112)))
    ours = [r.score for r in scorer.score(imgs)]
    ref = [stock_fast_score(tiny_loaded.model, tiny_loaded.processor, scorer.prompt,
                            PIXELS.resize(im), scorer.digit_ids) for im in imgs]
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert len({round(s, 4) for s in ref}) == 3  # the photos matter, or this proves little

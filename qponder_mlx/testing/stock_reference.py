"""Fast mode's score computed the plain way with stock mlx-vlm, as an independent reference.

No prefix cache, no batching: `mlx_vlm.utils.prepare_inputs` builds the inputs, the stock model
runs the whole sequence, and the score is E[digit] over the digits 1–5 computed in numpy. Tests
compare the product's `Scorer(mode="fast")` against it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from PIL import Image


def stock_fast_score(model, processor, prompt: str, image: Image.Image,
                     digit_ids: list[int]) -> float:
    """E[digit] for one resized image; `prompt` ends with the answer prefix, `digit_ids` are
    the tokens of 1..5."""
    from mlx_vlm.utils import prepare_inputs

    inputs = prepare_inputs(processor, images=[image], prompts=[prompt])
    logits = model(inputs["input_ids"], inputs["pixel_values"],
                   image_grid_thw=inputs["image_grid_thw"]).logits[0, -1]
    z = np.array(logits.astype(mx.float32), dtype=np.float64)[digit_ids]
    p = np.exp(z - z.max())
    return float((p / p.sum()) @ np.arange(1, 6))

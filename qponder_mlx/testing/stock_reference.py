"""Fast mode's score computed the plain way with stock mlx-vlm, as an independent reference.

No prefix cache, no batching, no KV cache reuse: `mlx_vlm.utils.prepare_inputs` builds the inputs,
the stock model runs the whole sequence, once for the prompt and once more with the most likely
leading digit and the dot appended, and the score is Σ p(d)·d + Σ q(k)·k / 10 computed in numpy.
Tests compare the product's `Scorer(mode="fast")` against it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from PIL import Image


def _softmax_at(logits: mx.array, ids: list[int]) -> np.ndarray:
    z = np.array(logits.astype(mx.float32), dtype=np.float64)[ids]
    p = np.exp(z - z.max())
    return p / p.sum()


def stock_fast_score(model, processor, prompt: str, image: Image.Image,
                     digit_ids: list[int], dot_id: int) -> tuple[float, float]:
    """(score with the first decimal, leading digit alone) for one resized image; `prompt`
    ends with the answer prefix, `digit_ids` are the tokens of 0..9."""
    from mlx_vlm.utils import prepare_inputs

    inputs = prepare_inputs(processor, images=[image], prompts=[prompt])
    ids, pv, grid = inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"]
    lead = _softmax_at(model(ids, pv, image_grid_thw=grid).logits[0, -1], digit_ids[1:6])
    d = int(lead.argmax()) + 1
    longer = mx.concatenate([ids, mx.array([[digit_ids[d], dot_id]], dtype=ids.dtype)], axis=1)
    dec = _softmax_at(model(longer, pv, image_grid_thw=grid).logits[0, -1], digit_ids)
    lead_only = float(lead @ np.arange(1, 6))
    return float(np.clip(lead_only + dec @ np.arange(10) / 10, 1, 5)), lead_only

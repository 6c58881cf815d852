"""The frozen vision tower's output per image, computed once per run instead of once per step.

When the vision tower has no trainable weights (LoRA on the language model only, the default), its
output is a fixed function of the image's pixels: SFT sees every image once per epoch, so from the
second epoch on the tower is pure repeated work (~30 % of a step for a 256 x 2 student with a 320 x
3 tower, bench/sft_step_speed.py). The features are stored in mlx-vlm's `VisionFeatureCache` (LRU,
by image path: the pixel budget is fixed for a run) and handed to the model through mlx-vlm's own
`cached_image_features` argument of `get_input_embeddings`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_vlm.vision_cache import VisionFeatureCache

# Models whose get_input_embeddings reads `cached_image_features` and whose tower takes
# (pixel_values, grid_thw): the Qwen2-VL family.
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def tower_is_frozen(model: nn.Module) -> bool:
    return not tree_flatten(model.vision_tower.trainable_parameters())


def features_are_fixed(model: nn.Module) -> bool:
    """The tower's output depends on the pixels alone (no trainable weights), and the model
    family takes precomputed features (`MODEL_TYPES`)."""
    return getattr(model.config, "model_type", "") in MODEL_TYPES and tower_is_frozen(model)


def tower_output(model: nn.Module, pixel_values: mx.array, grid_thw: mx.array) -> mx.array:
    """What `get_input_embeddings` computes from the pixels: (image tokens, hidden)."""
    tower = model.vision_tower
    dtype = tower.patch_embed.proj.weight.dtype
    return tower(pixel_values.astype(dtype), grid_thw, output_hidden_states=False)


class TowerFeatures:
    """Image features by key (the image's path); valid while the tower's weights stay fixed."""

    def __init__(self, model: nn.Module, max_images: int):
        self.model = model
        self.cache = VisionFeatureCache(max_size=max_images)
        self.computed = 0

    def __call__(self, key: str, pixel_values: mx.array, grid_thw: mx.array) -> mx.array:
        feats = self.cache.get(key)
        if feats is None:
            feats = tower_output(self.model, pixel_values, grid_thw)
            mx.eval(feats)
            self.cache.put(key, feats)
            self.computed += 1
        return feats


def tower_features(model: nn.Module, max_images: int) -> TowerFeatures | None:
    """A feature cache for `model`, or None where caching would be wrong (a trainable tower)
    or unsupported (another model family) or switched off (`max_images` 0)."""
    if max_images <= 0 or not features_are_fixed(model):
        return None
    return TowerFeatures(model, max_images)

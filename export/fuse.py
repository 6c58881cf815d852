"""Fold LoRA layers into their base weights: W' = W + scale · Bᵀ Aᵀ (mlx-vlm's own `fuse`).

A quantized base layer is dequantized first (`fuse(dequantize=True)`), so every fused layer comes
out float and is quantized again, once, with the bundle's settings (see quantize.py).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from qponder_mlx.train.lora import lora_layers


def fuse_lora(model: nn.Module) -> list[str]:
    """Replace every LoRA layer by its fused float layer, in place; returns the layer names."""
    layers = lora_layers(model)
    fused = [(name, layer.fuse(dequantize=True)) for name, layer in layers]
    if fused:
        model.update_modules(tree_unflatten(fused))
        mx.eval(model.parameters())
    return [name for name, _ in fused]

"""Quantize a fused model with MLX's own quantizer (mlx-vlm's `quantize_model`, as `convert`).

Which layers: every Linear/Embedding whose input width is a multiple of the group size, except
the vision tower unless asked (mlx-vlm's convert leaves it float too: it is small, and its errors
reach every image token). Layers of an already-quantized base that match the requested settings
are kept bit for bit; any other quantized layer is dequantized first, so the bundle is quantized
once, uniformly, and config.json's single `quantization` entry describes every layer.

Bits per weight counts everything stored: packed weights plus the per-group scales and biases
(affine: one scale and one bias per group in the model's float dtype, so 4 + 2·16/64 = 4.5 bits
for bf16 at group 64, 4 + 2·32/64 = 5.0 for float32).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_vlm.quant_utils import dequantize_model, get_total_parameters, quantize_model
from mlx_vlm.utils import skip_multimodal_module

from qponder_mlx.train.lora import base_quantization

from .config import QuantSpec

QUANT_KEYS = ("quantization", "quantization_config")


@dataclass
class QuantReport:
    spec: dict | None  # {group_size, bits, mode} or None for a float bundle
    quantize_vision: bool
    layers_quantized: int
    layers_float: int  # Linear/Embedding layers left in float
    float_layers: list[str] = field(default_factory=list)  # their names (why: see `reason`)
    reason_float: str = ""
    requantized_base: bool = False  # an already-quantized base was dequantized first
    bits_per_weight: float = 0.0  # whole model: stored bits / parameters
    language_model_bits_per_weight: float = 0.0
    quantized_layers_bits_per_weight: float | None = None  # the quantized layers alone

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "float_layers"}
        out["float_layers"] = self.float_layers[:50]  # names are for reading, not a full dump
        return out


def _keeps(name: str, params: dict, spec: QuantSpec) -> bool:
    """A base layer already quantized exactly as the bundle wants it needs no round trip."""
    vision_ok = spec.quantize_vision or not skip_multimodal_module(name)
    return vision_ok and params == spec.params()


def stored_bits_per_weight(module: nn.Module) -> float:
    """Bits of the tensors that get saved / parameters they stand for (mlx-vlm's count).

    mlx-vlm's compute_bits_per_weight also counts in-memory buffers that are never saved
    (rotary inverse frequencies); the bundle reports what its files hold.
    """
    bits = 8 * sum(v.nbytes for _, v in tree_flatten(module.parameters()))
    return bits / get_total_parameters(module)


def _quantized_bpw(model: nn.Module) -> float | None:
    bits = params = 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            stored = [m.weight, m.scales] + ([m.biases] if m.get("biases") is not None else [])
            bits += 8 * sum(a.nbytes for a in stored)
            params += m.weight.size * 32 // m.bits
    return bits / params if params else None


def quantize_for_bundle(model: nn.Module, config: dict,
                        spec: QuantSpec | None) -> tuple[dict, QuantReport]:
    """Quantize `model` in place per `spec` (None: make it all float); returns the new config.

    `config` is the base's config.json; the returned copy carries `quantization` exactly as
    mlx-vlm's convert writes it (and drops the base's, if it had one).
    """
    config = {k: v for k, v in config.items() if k not in QUANT_KEYS}
    existing = base_quantization(model)
    requant = bool(existing) and (spec is None or not all(
        _keeps(n, p, spec) for n, p in existing.items()))
    if requant:
        dequantize_model(model)

    if spec is not None:
        own = getattr(model, "quant_predicate", None)

        def predicate(path: str, module: nn.Module):
            if not spec.quantize_vision and skip_multimodal_module(path):
                return False
            return own(path, module) if own is not None else True

        # quantize_model prints a bits-per-weight line; we report it in the manifest instead.
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(model, config, spec.group_size, spec.bits,
                                           mode=spec.mode, quant_predicate=predicate)
    mx.eval(model.parameters())

    floats = sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)))
    if spec is None:
        reason = "float bundle (--no-quantize)"
    else:
        reason = (f"input width not a multiple of group size {spec.group_size}"
                  + ("" if spec.quantize_vision else ", or in the vision tower (kept float)"))
    report = QuantReport(
        spec=spec.params() if spec else None,
        quantize_vision=bool(spec and spec.quantize_vision),
        layers_quantized=len(base_quantization(model)),
        layers_float=len(floats), float_layers=floats, reason_float=reason,
        requantized_base=requant,
        bits_per_weight=round(stored_bits_per_weight(model), 4),
        language_model_bits_per_weight=round(stored_bits_per_weight(model.language_model), 4),
        quantized_layers_bits_per_weight=_round(_quantized_bpw(model)),
    )
    return config, report


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)

"""Offline stand-ins for tests, benches and trying every command without a download.

* `tiny_model`: a tiny random Qwen2.5-VL (`build_tiny_model`, `qponder dev tiny-model`);
* `sft_sets`: small SFT row files on the packaged CC0 images;
* `real_layouts`: folders laid out like the real hub repos (`build_real_layout` for
  qwen2.5-vl-3b, qwen2.5-vl-7b, qwen2-vl-2b; `quantize_real_layout` for the 4-bit copies).
"""

from qponder_mlx.testing.real_layouts import FLAVOURS, build_real_layout, quantize_real_layout
from qponder_mlx.testing.tiny_model import build_tiny_model

__all__ = ["FLAVOURS", "build_real_layout", "build_tiny_model", "quantize_real_layout"]

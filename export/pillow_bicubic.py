"""The resize qponder feeds its models, written out so an app can reproduce it bit for bit.

qponder resizes with Pillow's `Image.resize(size, BICUBIC)` on 8-bit RGB (qponder_mlx/images.py);
its models are trained and evaluated on exactly those pixels, and the fast score moves by up to
0.17 when another resampler is used (docs/export.md, "Resize parity"). This module restates that
algorithm (Pillow's libImaging/Resample.c, 8-bit path) in plain integer arithmetic, so that:

* an app can port these ~40 lines instead of calling CoreImage, and get the same bytes;
* the tests prove the statement complete: per axis it equals Pillow on every value, and on the
  shipped photos it equals the two-axis `Image.resize` qponder calls (test_export_resize.py);
  each bundle's golden/golden.json carries the resized pixels' sha256 to check a port with.

Pillow 13's two-axis resize runs the vertical pass first for some size pairs (seen on random
noise when widening and shortening at once), which moves some values by a few levels; on the 36
cc0_mini photos at the default and the 56-112 px pixel policies, also cropped to 224x150 and
150x224, it gave the documented order's output on all 39 M values.

Two passes, each on the previous pass's 8-bit output: horizontal (every row), then vertical.
Per axis:

1. scale = in_size / out_size; fscale = max(scale, 1); support = 2 * fscale;
2. for output pixel i: center = (i + 0.5) * scale; lo = max(0, int(center - support + 0.5));
   hi = min(in_size, int(center + support + 0.5)) (int() truncates toward zero);
3. weights w_j = K((j - center + 0.5) / fscale) for j in [lo, hi), K the Keys cubic with a = -0.5
   (|x| < 1: 1.5|x|^3 - 2.5|x|^2 + 1; 1 <= |x| < 2: -0.5|x|^3 + 2.5|x|^2 - 4|x| + 2; else 0),
   divided by their sum (double precision);
4. fixed point: k_j = trunc(w_j * 2^22 + 0.5) for w_j >= 0, trunc(w_j * 2^22 - 0.5) otherwise;
5. out = clamp((2^21 + sum_j k_j * in_j) >> 22, 0, 255) with an arithmetic shift, per channel.

An axis whose size does not change is not filtered (Pillow skips the pass).
"""

from __future__ import annotations

import numpy as np

# The same steps, as the manifest gives them to an app (pixels.preprocessing.resize.algorithm).
ALGORITHM = [
    "two separable passes on 8-bit values, each on the previous pass's 8-bit output: "
    "horizontal (every row), then vertical; an axis whose size does not change is skipped",
    "per axis, in double precision: scale = in_size / out_size; fscale = max(scale, 1); "
    "support = 2 * fscale",
    "output pixel i: center = (i + 0.5) * scale; lo = max(0, trunc(center - support + 0.5)); "
    "hi = min(in_size, trunc(center + support + 0.5))",
    "w_j = K((j - center + 0.5) / fscale) for j in [lo, hi); K(x) = 1.5|x|^3 - 2.5|x|^2 + 1 "
    "for |x| < 1, -0.5|x|^3 + 2.5|x|^2 - 4|x| + 2 for 1 <= |x| < 2, else 0 (Keys, a = -0.5); "
    "then w_j /= sum(w)",
    "k_j = trunc(w_j * 2^22 + 0.5) if w_j >= 0 else trunc(w_j * 2^22 - 0.5) (64-bit ints)",
    "out = clamp((2^21 + sum_j k_j * in_j) >> 22, 0, 255) per channel (arithmetic shift)",
]

PRECISION_BITS = 22  # Pillow: 32 - 8 (pixel) - 2 (headroom for negative lobes)
SUPPORT = 2.0  # the bicubic kernel's half-width at scale 1


def keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                    np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


def axis_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo per output pixel, fixed-point weights (out_size, in_size)): steps 1-4 above."""
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support = SUPPORT * fscale
    lo = np.zeros(out_size, dtype=np.int64)
    k = np.zeros((out_size, in_size), dtype=np.int64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        a = max(0, int(center - support + 0.5))
        b = min(in_size, int(center + support + 0.5))
        w = keys_cubic((np.arange(a, b) - center + 0.5) / fscale)
        total = w.sum()
        if total != 0.0:
            w = w / total
        q = w * (1 << PRECISION_BITS)
        k[i, a:b] = np.where(w < 0, np.trunc(q - 0.5), np.trunc(q + 0.5)).astype(np.int64)
        lo[i] = a
    return lo, k


def _pass(pixels: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    in_size = pixels.shape[axis]
    if in_size == out_size:
        return pixels
    _, k = axis_coefficients(in_size, out_size)
    moved = np.moveaxis(pixels.astype(np.int64), axis, 0)  # (in, other, channels)
    acc = np.tensordot(k, moved, axes=(1, 0)) + (1 << (PRECISION_BITS - 1))
    out = np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8, equal to Pillow's BICUBIC resize."""
    return _pass(_pass(rgb, width, axis=1), height, axis=0)

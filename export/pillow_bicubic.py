"""The resize qponder feeds its models, written out so an app can reproduce it bit for bit.

qponder resizes with `qponder_mlx.images.resize_bicubic`: Pillow's bicubic on 8-bit RGB, the
horizontal pass and then the vertical one (Pillow's own two-axis `resize` picks the order itself
and 13.x filters some portrait photos vertically first). The fast score moves by up to 0.5 when
another resampler is used (docs/export.md, "Resize parity"), so this module restates the
algorithm (Pillow's libImaging/Resample.c, 8-bit path) in plain integer arithmetic:

* an app ports these ~40 lines instead of calling CoreImage, and gets the same bytes;
* the tests prove the statement complete: it equals Pillow on every value of every pass and
  `PixelPolicy.resize` on the shipped photos, portrait shrinks included
  (tests/test_export_resize.py); each bundle's golden/golden.json carries the resized pixels'
  sha256 to check a port with.

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

An axis whose size does not change is not filtered.
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
    """Steps 1-4 for one axis: (lo, k), lo[i] the first input index of output i and k[i, t]
    the fixed-point weight of input lo[i] + t (zero past hi)."""
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support = SUPPORT * fscale
    taps = int(np.ceil(support)) * 2 + 1  # Pillow's ksize: enough for every window
    lo = np.zeros(out_size, dtype=np.int64)
    k = np.zeros((out_size, taps), dtype=np.int64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        a = max(0, int(center - support + 0.5))
        b = min(in_size, int(center + support + 0.5))
        w = keys_cubic((np.arange(a, b) - center + 0.5) / fscale)
        total = w.sum()
        if total != 0.0:
            w = w / total
        q = w * (1 << PRECISION_BITS)
        k[i, :b - a] = np.where(w < 0, np.trunc(q - 0.5), np.trunc(q + 0.5)).astype(np.int64)
        lo[i] = a
    return lo, k


def _pass(pixels: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    in_size = pixels.shape[axis]
    if in_size == out_size:
        return pixels
    lo, k = axis_coefficients(in_size, out_size)
    src = np.moveaxis(pixels, axis, 0).astype(np.int64)  # (in, other, channels)
    acc = np.full((out_size, *src.shape[1:]), 1 << (PRECISION_BITS - 1), dtype=np.int64)
    for t in range(k.shape[1]):  # one gather per tap: taps past hi weigh 0
        idx = np.minimum(lo + t, in_size - 1)
        acc += k[:, t, None, None] * src[idx]
    out = np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8: qponder's resize (Pillow's bicubic,
    horizontal pass then vertical)."""
    return _pass(_pass(rgb, width, axis=1), height, axis=0)

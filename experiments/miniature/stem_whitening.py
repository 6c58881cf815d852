"""Whiten the tiny student's image tokens over its training images (labels unused).

Why: the DCT stem's image-level features reach the language model as a few strong directions
(the overall texture level: the first singular value of the merger output over the training
images is 2.4x the second and 20x the tenth) while what tells neighbouring distortion levels
apart lies in weak ones. A linear softmax probe on *standardised* tower features tells the 15
(type, level) classes of the held-out views apart well enough for SRCC 0.948
(bench/stem_probe.py, `classes`, in git), yet the student's
language model, reading the raw tokens through LoRA on a random base, confused JPEG 4 with 5 and
noise 4 with 5 even on its training photos (train-photo SRCC 0.88). Gradient descent learns weak
input directions slowly; whitening makes every direction the data varies in equally strong.

What changes: only the merger's last linear (`vision_tower.merger.mlp.2`). With the mean image
token μ and the SVD of the centred tokens X − μ = U S Vᵀ over the training images, the k
directions with s_i > rel·s_1 are rescaled to one common spread σ and the rest dropped:

    y' = T (y − μ) + μ,    T = V_k diag(σ / s_i) V_kᵀ,    σ = e·sqrt(d / k)

where e² is the mean per-dimension variance of the tokens before (so the tokens keep their mean
and their total variance: the language model sees inputs of the same size as before). This is
ZCA whitening on the data's span; it is the one data-dependent piece of the stem, and it uses
second-order statistics of the training images only — no labels, no held-out images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qponder_mlx.io import atomic_write_json

MERGER_OUT = "vision_tower.merger.mlp.2"
RECORD = "whitening.json"  # written into the model folder: what was done, and a guard
DEFAULT_REL = 1e-2  # directions weaker than 1 % of the strongest are dropped (noise, not signal)


class WhiteningError(ValueError):
    pass


def image_token_means(model_dir: str | Path, images: Sequence[str | Path],
                      batch: int = 32) -> np.ndarray:
    """(n, hidden) mean of each image's tokens as the language model receives them (the merger
    output), at the processor's own pixel budget; the model is loaded once."""
    import mlx.core as mx

    from qponder_mlx import generate as gen
    from qponder_mlx.images import load_image
    from qponder_mlx.model import load_model

    loaded = load_model(str(model_dir))
    prompt = "<|vision_start|><|image_pad|><|vision_end|>"  # the image alone: no text needed
    out = []
    for i in range(0, len(images), batch):
        ims = [load_image(p) for p in images[i:i + batch]]
        inp = gen.encode(loaded.processor, [prompt] * len(ims), ims)
        tokens = loaded.model.vision_tower(inp["pixel_values"], inp["image_grid_thw"])
        out.append(np.array(tokens.reshape(len(ims), -1, tokens.shape[-1]).mean(1)))
        mx.clear_cache()
    return np.concatenate(out).astype(np.float64)


def whitening(features: np.ndarray, rel: float = DEFAULT_REL) -> tuple[np.ndarray, np.ndarray, int]:
    """(T, μ, k) for features (n, d): y' = T (y − μ) + μ has covariance σ² on the k strongest
    directions (σ = e·sqrt(d/k), e² the mean per-dimension variance of the input) and 0 off them."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise WhiteningError(f"whitening needs (n >= 2, d) features, got shape {x.shape}")
    mu = x.mean(0)
    _, s, vt = np.linalg.svd((x - mu) / np.sqrt(len(x)), full_matrices=False)
    if s[0] <= 0:
        raise WhiteningError("the image tokens do not vary over these images: nothing to whiten")
    k = int((s > rel * s[0]).sum())
    sigma = np.sqrt((s ** 2).sum() / x.shape[1]) * np.sqrt(x.shape[1] / k)
    v = vt[:k]
    return v.T @ np.diag(sigma / s[:k]) @ v, mu, k


def whiten_merger(model_dir: str | Path, images: Sequence[str | Path],
                  rel: float = DEFAULT_REL) -> dict:
    """Rewrite `model_dir`'s merger output layer so its image tokens are whitened over `images`
    (module docstring); records what it did in model_dir/whitening.json. Refuses a model that
    is already whitened (whitening twice would fit T to whitened tokens: a different model)."""
    import mlx.core as mx

    from qponder_mlx.train.lora import save_safetensors_atomic

    model_dir = Path(model_dir)
    weights_file = model_dir / "model.safetensors"
    if (model_dir / RECORD).exists():
        raise WhiteningError(f"{model_dir / RECORD}: this model is already whitened — whiten a "
                             "freshly built model (vision_stem.build_student), not this one")
    if not weights_file.exists():
        raise WhiteningError(f"{weights_file} is missing — pass a model folder written by "
                             "vision_stem.build_student")
    if len(images) < 2:
        raise WhiteningError(f"whitening needs at least 2 images, got {len(images)}")
    t, mu, k = whitening(image_token_means(model_dir, images), rel)
    weights = dict(mx.load(str(weights_file)))
    w2 = np.array(weights[MERGER_OUT + ".weight"], dtype=np.float64)
    b2 = np.array(weights[MERGER_OUT + ".bias"], dtype=np.float64)
    weights[MERGER_OUT + ".weight"] = mx.array((t @ w2).astype(np.float32))
    weights[MERGER_OUT + ".bias"] = mx.array((t @ (b2 - mu) + mu).astype(np.float32))
    # Atomic: a crash leaves the old weights and no record, so the step can simply be rerun.
    save_safetensors_atomic(weights_file, weights, metadata={"format": "mlx"})
    record = {"layer": MERGER_OUT, "images": len(images), "rel": rel, "directions": k,
              "hidden": int(w2.shape[0])}
    atomic_write_json(model_dir / RECORD, record)
    return record


def images_of(label_file: str | Path) -> list[Path]:
    """The image paths of a label file (any format `load_labels` reads); MOS values unused."""
    from qponder_mlx.labels import load_labels

    return [s.image for s in load_labels(label_file)]


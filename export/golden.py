"""Golden vectors: what the exported model computes on three shipped images, to test an app by.

At export, with the bundle's own weights and pixel policy, for each of three CC0 images from
`qponder_mlx/assets/cc0_mini` (copied into the bundle's `golden/` folder): the resized pixels
(size, sha256 of the 8-bit RGB bytes, a few values), the processor's grid (t, h, w) and a few
normalised patch values, the full input ids of the reasoning and the fast prompt, the fast-mode
digit probabilities and score, and the first `REASON_TOKENS` greedy tokens (ids and text).

An app that reproduces these step by step (pixels -> ids -> probabilities -> tokens) runs the
model as qponder does; `qponder bundle verify` recomputes them in its own process and fails on a
difference (score or probability > `SCORE_TOL`, any id or pixel). The folder holds no
*.safetensors file: MLX Swift's loader would read one as weights (swift_compat.py).
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path, PurePosixPath

import mlx.core as mx
import numpy as np

import qponder_mlx
from qponder_mlx import generate as gen
from qponder_mlx.images import PixelPolicy, load_image
from qponder_mlx.prompts import FAST_ANSWER_PREFIX, chat_messages
from qponder_mlx.readout import score_token_ids

GOLDEN_DIR = "golden"
GOLDEN_FILE = f"{GOLDEN_DIR}/golden.json"
ASSETS = Path(qponder_mlx.__file__).parent / "assets" / "cc0_mini" / "images"
# Three photos, three distortions (KADID levels 1, 3, 5), 158 kB together.
GOLDEN_IMAGES = ("astronaut_jpeg_1.jpg", "chelsea_noise_3.png", "rocket_blur_5.png")
REASON_TOKENS = 16
SCORE_TOL = 1e-3  # fast score and digit probabilities; ids, pixels and tokens must be equal
PIXEL_VALUE_TOL = 1e-4  # normalised patch values (float32 arithmetic)


def rendered_prompt(tokenizer) -> str:
    """The reasoning prompt as the bundle's chat template renders it (one image placeholder)."""
    return tokenizer.apply_chat_template(chat_messages(), tokenize=False,
                                         add_generation_prompt=True)


def _pixel_samples(rgb: np.ndarray) -> list[dict]:
    h, w, _ = rgb.shape
    spots = [(0, 0), (w // 2, h // 2), (w - 1, h - 1), (w // 3, 2 * h // 3)]
    return [{"x": x, "y": y, "rgb": [int(v) for v in rgb[y, x]]} for x, y in spots]


def _spread(n: int, k: int = 16) -> list[int]:
    # An odd stride (n / k rounded, made odd) walks through patches, channels and rows alike.
    step = max(1, n // k) | 1
    return [(i * step) % n for i in range(k)]


def compute_one(loaded, image: Path, pixels: PixelPolicy, n_tokens: int = REASON_TOKENS) -> dict:
    """The golden entry of one image (no prefix cache: the plain computation an app does)."""
    model, proc, tok = loaded.model, loaded.processor, loaded.tokenizer
    prompt = rendered_prompt(tok)
    img = pixels.resize(load_image(image))
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    inputs = gen.encode(proc, [prompt], [img])
    fast_inputs = gen.encode(proc, [prompt + FAST_ANSWER_PREFIX], [img])
    digit_ids = score_token_ids(tok)
    logits = gen.prefill_logits(model, fast_inputs)
    probs = mx.softmax(logits[0, mx.array(digit_ids)].astype(mx.float32), axis=-1)
    probs = [float(p) for p in np.array(probs)]
    (comp,), = gen.generate_rows(model, proc, [prompt], [img],
                                 gen.SamplingConfig(max_tokens=n_tokens, temperature=0.0))
    pv = np.array(inputs["pixel_values"], dtype=np.float32).reshape(-1)
    return {
        "image": f"{GOLDEN_DIR}/{image.name}",
        "image_sha256": hashlib.sha256(image.read_bytes()).hexdigest(),
        "resized": {"width": img.width, "height": img.height,
                    "rgb_sha256": hashlib.sha256(rgb.tobytes()).hexdigest(),
                    "samples": _pixel_samples(rgb)},
        "pixel_values": {"shape": list(inputs["pixel_values"].shape),
                         "first": [round(float(v), 6) for v in pv[:8]],
                         # spread over every patch and channel: checks the patch order too
                         "at": {str(i): round(float(pv[i]), 6) for i in _spread(pv.size)},
                         "mean": round(float(pv.mean()), 6)},
        "grid_thw": [int(v) for v in np.array(inputs["image_grid_thw"]).reshape(-1)],
        "input_ids": [int(v) for v in np.array(inputs["input_ids"]).reshape(-1)],
        "fast_input_ids": [int(v) for v in np.array(fast_inputs["input_ids"]).reshape(-1)],
        "fast": {"digit_probs": [round(p, 6) for p in probs],
                 "score": round(float(np.dot(probs, np.arange(1, 6))), 6)},
        "reason": {"max_tokens": n_tokens, "token_ids": [int(t) for t in comp.token_ids],
                   "text": tok.decode(comp.token_ids)},
    }


def compute(loaded, pixels: PixelPolicy, images: list[Path] | None = None,
            n_tokens: int = REASON_TOKENS) -> dict:
    """The golden.json document for a loaded bundle."""
    images = images if images is not None else [ASSETS / n for n in GOLDEN_IMAGES]
    return {
        "about": "qponder golden vectors: recompute them in the app and compare (docs/export.md,"
                 " 'Self-test an app')",
        "pixels": {"min_pixels": pixels.min_pixels, "max_pixels": pixels.max_pixels},
        "tolerance": {"score": SCORE_TOL, "digit_probs": SCORE_TOL,
                      "pixel_values": PIXEL_VALUE_TOL,
                      "exact": ["resized", "grid_thw", "input_ids", "fast_input_ids",
                                "reason.token_ids"]},
        "computed_with": {"mlx": _version("mlx"), "mlx-vlm": _version("mlx-vlm"),
                          "pillow": _version("pillow"), "device": str(mx.default_device()),
                          "machine": platform.machine()},
        "images": [compute_one(loaded, p, pixels, n_tokens) for p in images],
    }


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def compare(want: dict, got: dict) -> list[str]:
    """One line per golden value that `got` (a recomputation) does not reproduce."""
    out = []
    for w, g in zip(want.get("images", []), got.get("images", [])):
        name = w.get("image")
        for key in ("resized", "grid_thw", "input_ids", "fast_input_ids"):
            if w.get(key) != g[key]:
                out.append(f"{GOLDEN_FILE}: {name} {key} differs from the recomputation")
        wp, gp = w.get("pixel_values", {}), g["pixel_values"]
        keys = sorted(gp["at"])
        if wp.get("shape") != gp["shape"] or not _close(
                wp.get("first"), gp["first"], PIXEL_VALUE_TOL) or not _close(
                [wp.get("at", {}).get(k) for k in keys], [gp["at"][k] for k in keys],
                PIXEL_VALUE_TOL):
            out.append(f"{GOLDEN_FILE}: {name} pixel_values differ from the recomputation")
        wf, gf = w.get("fast", {}), g["fast"]
        if not _close([wf.get("score")], [gf["score"]], SCORE_TOL):
            out.append(f"{GOLDEN_FILE}: {name} fast score {wf.get('score')} recomputed as "
                       f"{gf['score']} (tolerance {SCORE_TOL})")
        elif not _close(wf.get("digit_probs"), gf["digit_probs"], SCORE_TOL):
            out.append(f"{GOLDEN_FILE}: {name} fast digit_probs differ from the recomputation")
        wt, gt = w.get("reason", {}).get("token_ids"), g["reason"]["token_ids"]
        if wt != gt:
            at = next((i for i, (a, b) in enumerate(zip(wt or [], gt)) if a != b),
                      min(len(wt or []), len(gt)))
            out.append(f"{GOLDEN_FILE}: {name} greedy token {at} differs from the "
                       "recomputation")
    if len(want.get("images", [])) != len(got.get("images", [])):
        out.append(f"{GOLDEN_FILE}: lists {len(want.get('images', []))} images, "
                   f"{len(got.get('images', []))} recomputed")
    return out


def _close(a, b, tol: float) -> bool:
    try:
        return len(a) == len(b) and all(abs(float(x) - float(y)) <= tol for x, y in zip(a, b))
    except (TypeError, ValueError):
        return False


def recompute(loaded, golden: dict, folder: Path) -> dict:
    """Recompute `golden` from the images in `folder/golden` with the same settings."""
    px = golden.get("pixels", {})
    pixels = PixelPolicy(min_pixels=int(px["min_pixels"]), max_pixels=int(px["max_pixels"]))
    images = []
    for e in golden.get("images", []):
        rel = PurePosixPath(str(e.get("image", "")))
        if rel.parts[:1] != (GOLDEN_DIR,) or ".." in rel.parts or len(rel.parts) != 2:
            raise ValueError(f"{GOLDEN_FILE}: image {str(rel)!r} is not a file in {GOLDEN_DIR}/")
        images.append(folder / rel)
    n = max((e.get("reason", {}).get("max_tokens", REASON_TOKENS)
             for e in golden.get("images", [])), default=REASON_TOKENS)
    return compute(loaded, pixels, images, n)


def verify_folder(folder: str | Path, manifest: dict) -> list[str]:
    """Load the bundle and recompute its golden vectors; one line per mismatch.

    Call after `verify_bundle` passed (checksums and safetensors headers), so that what loads
    is what was exported. A bundle made before golden vectors existed has nothing to compare.
    """
    from qponder_mlx.model import load_model

    folder = Path(folder)
    if not manifest.get("golden"):
        return []
    try:
        want = json.loads((folder / GOLDEN_FILE).read_text())
        loaded = load_model(str(folder))
        got = recompute(loaded, want, folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{folder / GOLDEN_FILE}: cannot recompute ({type(e).__name__}: "
                f"{' '.join(str(e).split())})"]
    return compare(want, got)

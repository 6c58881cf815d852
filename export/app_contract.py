"""The manifest sections an app follows without Python: token ids and the exact preprocessing.

Every string the manifest already carries (prompt, answer prefix, stop and banned tokens) gets
its token ids from the bundle's own tokenizer, and the image path is spelled out step by step
(decode, orientation, alpha, resize with its rounding and filter, normalisation), so an app can
build the model's input ids and pixels itself and check them against the golden vectors.
"""

from __future__ import annotations

from importlib import metadata

from qponder_mlx import generate as gen
from qponder_mlx.images import PixelPolicy
from qponder_mlx.prompts import FAST_ANSWER_PREFIX
from qponder_mlx.readout import score_token_ids

from .golden import rendered_prompt
from .pillow_bicubic import ALGORITHM
from .verify import BundleError


class ContractError(BundleError):
    """The bundle's tokenizer cannot express the prompt as the app contract needs (one line)."""


def _ids(tok, text: str) -> list[int]:
    return [int(t) for t in tok.encode(text, add_special_tokens=False)]


def tokens_section(loaded) -> dict:
    """Token ids of the rendered prompts, the image placeholder rule, digits, stops, bans."""
    tok, cfg = loaded.tokenizer, loaded.model.config
    pad = int(cfg.image_token_id)
    merge = int(cfg.vision_config.spatial_merge_size)
    prompt = rendered_prompt(tok)
    ids = _ids(tok, prompt)
    fast = _ids(tok, prompt + FAST_ANSWER_PREFIX)
    if ids.count(pad) != 1 or fast.count(pad) != 1:
        raise ContractError("the rendered prompt does not hold exactly one <|image_pad|> token — "
                            "the bundle's chat template is not Qwen2.5-VL's")
    i, j = ids.index(pad), fast.index(pad)
    stops = gen.stop_tokens(loaded.model, tok)
    digits = score_token_ids(tok)
    return {
        "tokenizer": "the bundle's tokenizer.json; ids below are what it gives for the strings "
                     "in `prompt` and `generation` (no BOS is added)",
        "reason_prompt": {"before_image": ids[:i], "after_image": ids[i + 1:]},
        "fast_prompt": {"before_image": fast[:j], "after_image": fast[j + 1:]},
        "answer_prefix_ids": _ids(tok, FAST_ANSWER_PREFIX),
        "image_pad_id": pad,
        "image_pads": {"merge_size": merge,
                       "rule": "input ids = before_image + [image_pad_id] * n + after_image, n = "
                               "grid_t * grid_h * grid_w / merge_size^2 = (height / 28) * "
                               "(width / 28) for one resized image (grid_t = 1, grid_h = "
                               "height / 14, grid_w = width / 14)"},
        "digits": [{"id": d, "text": str(v), "value": v} for v, d in enumerate(digits, start=1)],
        "stop_ids": sorted(stops.stop),
        "banned_ids": [int(b) for b in stops.banned],
    }


def _pillow() -> str:
    try:
        return metadata.version("pillow")
    except metadata.PackageNotFoundError:
        return "unknown"


def preprocessing_section(policy: PixelPolicy, preprocessor: dict) -> dict:
    """Exactly what qponder does to a photo before the model sees it (qponder_mlx/images.py)."""
    f = policy.factor
    return {
        "decode": {
            "exif": "orientation applied (Pillow ImageOps.exif_transpose); an unreadable EXIF "
                    "block leaves the pixels as stored",
            "colour_space": "8-bit RGB values as stored in the file, treated as sRGB; embedded "
                            "ICC profiles are not applied",
            "alpha": "composited over opaque white (255, 255, 255) with Pillow's "
                     "alpha_composite, then dropped",
            "other_modes": "palette, grey, CMYK: Pillow convert('RGB'); 16-bit grey: value / "
                           "257 rounded; animated: the first frame",
            "full_decode": "every pixel decoded (qponder_mlx.images.load_image, as eval and the "
                           "golden vectors do); qponder score's library job decodes large JPEGs "
                           "reduced first (load_for_model, >= 2.5x the model's size)",
        },
        "resize": {
            "target": f"smart_resize(height, width, factor={f}, min_pixels={policy.min_pixels}, "
                      f"max_pixels={policy.max_pixels}) -> (h, w), both multiples of {f}",
            "steps": [
                f"h = max({f}, round(height / {f}) * {f}); w = max({f}, round(width / {f}) * "
                f"{f}) — round() is round-half-to-even (Python), e.g. 70 / 28 = 2.5 -> 2",
                f"if h * w > max_pixels: beta = sqrt(height * width / max_pixels); h = max({f}, "
                f"floor(height / beta / {f}) * {f}); w likewise with width",
                f"elif h * w < min_pixels: beta = sqrt(min_pixels / (height * width)); h = "
                f"ceil(height * beta / {f}) * {f}; w likewise",
                "if the result is more than 200:1, the long side is trimmed to 200 x the short "
                "one (or the short one grows by one factor if that falls under min_pixels)",
                "no resampling when (w, h) equals the image's size",
            ],
            "arithmetic": "IEEE double precision",
            "filter": "Pillow's BICUBIC, horizontal pass then vertical (qponder_mlx.images."
                      "resize_bicubic): separable cubic convolution (Keys, a = -0.5), "
                      "antialiased when shrinking, in fixed point with 8-bit rounding after each "
                      "pass; `algorithm` states it exactly (reference port: "
                      "qponder_mlx/export/pillow_bicubic.py)",
            "algorithm": ALGORITHM,
            "filter_space": "on the 8-bit gamma-encoded (sRGB) values, not in linear light",
            "pillow": _pillow(),
        },
        "normalize": {
            "rescale": "value / 255 (float32)",
            "image_mean": preprocessor.get("image_mean"),
            "image_std": preprocessor.get("image_std"),
            "then": "(x - mean) / std per channel; patches of 14 x 14 x 2 frames (the image "
                    "repeated), merged 2 x 2, as Qwen2-VL's image processor orders them",
        },
        "mlx_swift": "Qwen25VLProcessor resizes with CoreImage's bicubic (CIBicubicScaleTransform)"
                     " and rounds half away from zero in its smart_resize: feed it an image "
                     "already resized as above so its own resize keeps the size, and check the "
                     "pixels against golden/golden.json",
    }

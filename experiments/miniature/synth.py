"""A KADID-style synthetic IQA set from real CC0 photos: blur, white noise and JPEG at KADID-10k's
five levels, each image labelled with KADID-10k's mean human MOS for its (type, level).

The level MOS table is the mean of KADID-10k's published per-image MOS over its 81 reference
images at each (type, level); on real KADID this label alone reaches SRCC 0.958 against the
per-image MOS for these three types, so it is a meaningful target offline.
"""

from __future__ import annotations

import io
import json
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

# KADID-10k generator parameters, levels 1 (mild) .. 5 (severe).
LEVELS = {
    "blur": [0.1, 0.5, 1.0, 2.0, 5.0],  # Gaussian sigma, kernel 2*ceil(2*sigma)+1
    "noise": [0.001, 0.002, 0.003, 0.005, 0.01],  # white-noise variance on [0, 1] RGB
    "jpeg": [43, 36, 24, 7, 4],  # JPEG quality
}
# KADID-10k mean MOS (1-5) per level for GBLUR, AWGN, JPEG.
LEVEL_MOS = {
    "blur": [4.612, 4.382, 2.911, 1.873, 1.303],
    "noise": [3.893, 3.390, 3.045, 2.710, 2.301],
    "jpeg": [4.338, 4.246, 3.866, 1.945, 1.350],
}
DISTORTIONS = tuple(LEVELS)


def level_mos(kind: str, level: int) -> float:
    """KADID's mean MOS of a distortion at level 1-5 (the levels count from 1, the lists from 0)."""
    return LEVEL_MOS[kind][level - 1]

# Photos bundled with scikit-image that its docstrings mark CC0 / public domain / no restrictions.
CC0_PHOTOS = {
    "astronaut": "public domain (NASA)",
    "chelsea": "CC0 (Stefan van der Walt)",
    "coffee": "CC0 (Rachel Michetti)",
    "rocket": "public domain (SpaceX)",
    "camera": "CC0 (Lav Varshney)",
    "coins": "public domain (Walters Art Museum)",
    "hubble_deep_field": "public domain (NASA)",
    "brick": "CC0 (Stefan van der Walt)",
    "grass": "CC0 (Stefan van der Walt)",
    "gravel": "CC0 (Stefan van der Walt)",
    # Unusual content on purpose: large flat areas (the retina's black surround, the board behind
    # the text) next to sharp detail teach a small student that "little energy" is not "blurred".
    "retina": "CC0 (Mikael Häggström, Wikimedia Commons)",
    "text": "public domain (Wikipedia, Corner.png)",
    "immunohistochemistry": "no known copyright restrictions (CMMI)",
}


def crop_view(photo: str, k: int) -> str:
    """The name of random crop `k` of `photo` (`synth_iqa.py --crops`)."""
    return f"{photo}_crop{k}"


def view_index(photo: str, view: str) -> int:
    """0 for the photo itself, k + 1 for its crop k: the inverse of `crop_view`."""
    return 0 if view == photo else int(view.removeprefix(photo + "_crop")) + 1


def view_seed(seed: int, name: str) -> int:
    """The random seed of one named view (its noise draw, its crops): a function of the run seed
    and the view's own name only, so a held-out image is the same whatever else is in the set."""
    return zlib.crc32(f"{seed}/{name}".encode())


def distort(img: Image.Image, kind: str, level: int, *, seed: int = 0) -> Image.Image:
    """Apply distortion `kind` at KADID level 1..5 to an RGB image."""
    if kind not in LEVELS or not 1 <= level <= 5:
        raise ValueError(f"unknown distortion {kind!r} level {level} (kinds {DISTORTIONS}, 1..5)")
    p = LEVELS[kind][level - 1]
    if kind == "jpeg":
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=int(p))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    x = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
    if kind == "blur":
        radius = math.ceil(2 * p)  # KADID's kernel size 2*ceil(2*sigma)+1
        x = np.stack([gaussian_filter(x[..., c], p, truncate=radius / p) for c in range(3)], -1)
    else:
        rng = np.random.default_rng(seed)
        x = x + rng.normal(0.0, math.sqrt(p), size=x.shape)
    return Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the short side to `size`, then take the centred square."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_crops(img: Image.Image, size: int, n: int, *, seed: int = 0) -> list[Image.Image]:
    """`n` random square crops resized to `size`: side uniform between the short side and
    `size` pixels (from a whole-photo view down to native resolution), random place, random
    horizontal flip. More content per photo is what keeps a small student from learning the
    photo instead of its quality."""
    rng = np.random.default_rng(seed)
    w, h = img.size
    out = []
    for _ in range(n):
        side = int(rng.integers(min(size, w, h), min(w, h) + 1))
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BICUBIC)
        out.append(crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return out


def load_cc0_photo(name: str) -> Image.Image:
    """A CC0 photo from scikit-image's bundled data (no network)."""
    try:
        import skimage.data
    except ImportError:
        raise RuntimeError("scikit-image is needed for the synthetic set: "
                           "pip install 'qponder-mlx[bench]'") from None
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


@dataclass(frozen=True)
class SynthItem:
    file: str
    reference: str
    distortion: str
    level: int
    mos: float
    view: str = ""     # the name of the undistorted view (the photo itself or one of its crops)


def write_set(out: str | Path, references: dict[str, Image.Image], *,
              kinds: Iterable[str] = DISTORTIONS, levels: Iterable[int] = range(1, 6),
              split: dict[str, str] | None = None, seed: int = 0,
              photo_of: dict[str, str] | None = None) -> list[SynthItem]:
    """Write distorted images and `labels.jsonl`: JPEG-distorted ones as the .jpg the distortion
    itself produces (bit-exact), the others as lossless PNG.

    `references` maps an image name to its undistorted image; `photo_of` maps that name to the
    photo it was cut from (default: itself) — the `reference` field and the split follow the
    photo, so crops of one photo never straddle train and test. `split` maps a photo name (or,
    to override its photo, one view's name) -> split name; each split also gets `<split>.jsonl`.
    """
    photo_of, split = photo_of or {}, split or {}
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    items: list[SynthItem] = []
    for name, ref in sorted(references.items()):
        for kind in kinds:
            for level in levels:
                fname = f"images/{name}_{kind}_{level}." + ("jpg" if kind == "jpeg" else "png")
                if kind == "jpeg":
                    ref.convert("RGB").save(out / fname, quality=LEVELS[kind][level - 1])
                else:
                    distort(ref, kind, level, seed=view_seed(seed, name)).save(out / fname)
                items.append(SynthItem(fname, photo_of.get(name, name), kind, level,
                                       level_mos(kind, level), name))

    def dump(path: Path, rows: list[SynthItem]) -> None:
        with path.open("w") as f:
            for it in rows:
                f.write(json.dumps({"image": it.file, "mos": it.mos, "id": Path(it.file).stem,
                                    "reference": it.reference, "distortion": it.distortion,
                                    "level": it.level, "view": it.view}) + "\n")

    dump(out / "labels.jsonl", items)

    def split_of(it: SynthItem) -> str | None:  # a view's own entry wins over its photo's
        return split.get(it.view, split.get(it.reference))

    for name in sorted(set(split.values())):
        dump(out / f"{name}.jsonl", [it for it in items if split_of(it) == name])
    return items

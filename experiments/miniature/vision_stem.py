"""A fixed "DCT energy" stem for the random tiny Qwen2.5-VL's vision tower.

A pretrained Qwen2.5-VL already sees blur, noise and blocking; a randomly initialised ViT does
not, and from a handful of photos it learns to recognise the *photo* rather than its *quality*
(docs/reproduction.md). Quality lives in second-order statistics (how much energy each spatial
frequency carries), which a freshly initialised ViT — nearly linear in its pixels, then mean-pooled
— hardly represents. This stem writes that prior into the stock weights, so the model stays the
stock mlx-vlm class and every weight stays trainable:

- patch embedding = the orthonormal 2-D DCT-II basis of each 14×14 patch's luma (AC terms only),
- block 0 attention writes a constant channel (its output bias), which makes block 0's RMSNorm
  nearly scale-preserving, and its gated MLP turns each coefficient c into a soft |c|
  (silu(s·c) + silu(-s·c)) summed per radial frequency band u + v, and the same soft |·| of
  neighbouring-pixel differences, split into pairs that can straddle an 8-pixel JPEG block
  boundary and pairs that cannot (blockiness),
- later blocks start as the identity (zero output projections, as in zero-init residual nets),
- block 1's gated MLP takes a log of each of these 28 features (a sum of saturating ramps),
- block 2's attention pools the logs over the image twice, weighted towards its most textured
  patches and towards its flattest ones (softmax attention on a texture score), centred, with the
  blockiness pair as one amplified log ratio,
- the merger reads only those image-level features.

No label or image information goes into it: it is the same for every seed and data set.
"""

from __future__ import annotations

import numpy as np

PATCH = 14
N_AC = PATCH * PATCH - 1          # 195 AC coefficients per patch
N_BANDS = 2 * PATCH - 2           # radial bands u + v = 1 .. 26
# Feature channels: the 26 band amplitudes, then mean |neighbour difference| across the pairs
# that can hold a JPEG block boundary and across those that cannot (a Wang-Bovik-style
# blockiness pair: their ratio is 1 on natural images and grows with blocking).
N_FEAT = N_BANDS + 2
BOUNDARY, INTERIOR = N_BANDS, N_BANDS + 1
CONST = 64.0                      # value of the constant channel written by block 0
SOFTABS_GAIN = 160.0              # s in silu(s y) + silu(-s y) ≈ s |y| once |c| > ~0.05
# Ramp starts of the log stage: each ramp rises by 1 from t to 4t, so their sum ≈ log4(x / 0.004)
# over the band amplitudes seen on photos (0.004 .. 4; flat patches give 0).
LOG_RAMPS = (0.004, 0.016, 0.064, 0.256, 1.024)
LOG_CENTRE = 2.5                  # middle of the ramps' 0..5 output range
BLOCK_GAIN = 4.0                  # log4(B / I) is ~0 on natural images and ~0.1-0.5 when blocky
# Block 2 pools each image twice: towards its most textured patches (+1) and its flattest (-1).
# The texture score of a patch is its mean log4 amplitude over the low bands u + v = 1..8 (the
# content, which mild blur and noise hardly move); the attention weight is 4^(POOL_SHARPNESS *
# texture), i.e. ~ energy^4: a soft max / min over patches.
POOLS = (1.0, -1.0)
TEXTURE_BANDS = 8
POOL_SHARPNESS = 4.0
N_GLOBAL = len(POOLS) * N_FEAT
STEM_HIDDEN = 320                 # 195 + 2 x 28 + 56 + 1 = 308 channels used, 20 heads of 16
_HEAD = 16                        # head dim of the stem's attention (hidden / heads)
_SLOW_ROTARY = 3                  # the q/k dim whose rotary angle is position x 1e-3 (~constant)
# block 0: soft |c| of every coefficient (2 units each) and of every neighbour difference, both
# axes (2 units each); block 1: two units per ramp per feature
_N_PAIRS = 2 * PATCH * (PATCH - 1)    # 14 rows x 13 pairs, both axes
STEM_MIN_INTERMEDIATE = max(2 * N_AC + 2 * _N_PAIRS, 2 * N_FEAT * len(LOG_RAMPS))
# Luma weights (BT.601) and Qwen2.5-VL's pixel normalisation (preprocessor_config.json): the
# patch embedding sees (rgb - mean) / std, so luma AC = sum_c w_c std_c x_c.
LUMA = np.array([0.299, 0.587, 0.114])
PIXEL_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def dct_basis(n: int = PATCH) -> np.ndarray:
    """Orthonormal DCT-II matrix D[k, i] (rows are basis functions)."""
    k, i = np.arange(n)[:, None], np.arange(n)[None]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    d[0] /= np.sqrt(2)
    return d


def ac_frequencies(n: int = PATCH) -> list[tuple[int, int]]:
    """The (u, v) of every AC coefficient, low to high radial frequency."""
    return sorted(((u, v) for u in range(n) for v in range(n) if u or v),
                  key=lambda f: (f[0] + f[1], f))


def stem_layout(hidden: int) -> dict[str, int]:
    """Channel layout of the residual stream: the AC coefficients (from 0), the 28 features
    ("bands"), their logs ("log"), their image-level values ("global": N_FEAT per pool, in
    `POOLS` order), the constant."""
    need = N_AC + 2 * N_FEAT + N_GLOBAL + 1
    if hidden < need:
        raise ValueError(f"the DCT stem needs vision hidden size >= {need} (got {hidden}); "
                         f"use vision_hidden={STEM_HIDDEN}")
    return {"bands": N_AC, "log": N_AC + N_FEAT, "global": N_AC + 2 * N_FEAT,
            "const": hidden - 1}


def ac_basis() -> np.ndarray:
    """The AC basis functions as (N_AC, 14, 14) images, in `ac_frequencies` order."""
    d = dct_basis()
    return np.stack([np.outer(d[u], d[v]) for u, v in ac_frequencies()])


def _identity_branches(w: dict, block: int, h: int, inter: int, *parts: str) -> None:
    """Zero the output projection of `parts` ("attn.proj", "mlp.down_proj") of a block, so the
    branch adds nothing to the residual stream at init (zero-init residual nets)."""
    for part in parts:
        name = f"vision_tower.blocks.{block}.{part}"
        w[name + ".weight"] = np.zeros((h, h if part == "attn.proj" else inter), np.float32)
        w[name + ".bias"] = np.zeros((h,), np.float32)


def grid_pairs(n: int = PATCH) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Neighbour pairs (a, b) along one axis of a patch: (odd, even) pairs, which hold every
    8-pixel JPEG block boundary, and (even, odd) pairs, which never do.

    Patches start at multiples of 14 ≡ 6 (mod 8), so a boundary between pixels 8m-1 and 8m lands
    between local positions c-1 and c with c = 8m - 14i even — whatever the patch.
    """
    boundary = [(c - 1, c) for c in range(2, n, 2)]
    interior = [(c, c + 1) for c in range(0, n - 1, 2)]
    return boundary, interior


def dct_stem_weights(vision_cfg: dict) -> dict[str, np.ndarray]:
    """Stem weights for `VisionModel` parameters, keyed like `model.parameters()` (vision_tower.*).

    Only the stem's own parameters are returned; everything else keeps its random init.
    """
    h = int(vision_cfg["hidden_size"])
    inter = int(vision_cfg["intermediate_size"])
    depth = int(vision_cfg["depth"])
    out_h = int(vision_cfg["out_hidden_size"])
    if vision_cfg.get("patch_size") != PATCH or vision_cfg.get("temporal_patch_size") != 2:
        raise ValueError("the DCT stem is written for 14x14 patches with temporal size 2")
    if inter < STEM_MIN_INTERMEDIATE or depth < 3:
        raise ValueError("the DCT stem needs vision depth >= 3 and intermediate size >= "
                         f"{STEM_MIN_INTERMEDIATE} (got depth {depth}, intermediate {inter})")
    lay = stem_layout(h)
    freqs = ac_frequencies()
    basis = ac_basis()
    w: dict[str, np.ndarray] = {}

    # Patch embedding (MLX Conv3d layout: out, t, kh, kw, in). The two frames are the same image,
    # so each gets half the basis: the output is the coefficient of the (single) frame's luma.
    pe = np.zeros((h, 2, PATCH, PATCH, 3), np.float32)
    pe[:N_AC] = 0.5 * basis[:, None, :, :, None] * (LUMA * PIXEL_STD)
    w["vision_tower.patch_embed.proj.weight"] = pe

    # Block 0: attention adds a constant channel and nothing else.
    b0 = "vision_tower.blocks.0."
    w[b0 + "attn.qkv.weight"] = np.zeros((3 * h, h), np.float32)
    w[b0 + "attn.qkv.bias"] = np.zeros((3 * h,), np.float32)
    w[b0 + "attn.proj.weight"] = np.zeros((h, h), np.float32)
    bias = np.zeros((h,), np.float32)
    bias[lay["const"]] = CONST
    w[b0 + "attn.proj.bias"] = bias
    # RMSNorm(x) ≈ x * sqrt(h) / CONST while the patch's AC energy << CONST^2: scale-preserving.
    y_const = np.sqrt(h)                 # the constant channel after the norm
    y_gain = np.sqrt(h) / CONST          # coefficient c -> y = c * y_gain
    gate = np.zeros((inter, h), np.float32)
    up = np.zeros((inter, h), np.float32)
    down = np.zeros((h, inter), np.float32)
    s = SOFTABS_GAIN
    n_band = np.bincount([u + v for u, v in freqs])       # coefficients per radial band
    for k, (u, v) in enumerate(freqs):
        band = u + v - 1
        for j, sign in ((2 * k, 1.0), (2 * k + 1, -1.0)):
            gate[j, k] = sign * s
            up[j, lay["const"]] = 1.0 / y_const              # = 1: the gate's silu passes alone
            # silu(s y) + silu(-s y) ≈ s |y| = s y_gain |c|; averaged over the band, then scaled
            # by the band's radial frequency (natural images' amplitude falls ~ 1/f, so every
            # band channel starts at a similar size).
            down[lay["bands"] + band, j] = (u + v) / (s * y_gain * n_band[u + v])
    # Neighbour differences are linear in the AC coefficients (the DC cancels): with orthonormal
    # basis images B_k, y[r, a] - y[r, b] = sum_k c_k (B_k[r, a] - B_k[r, b]).
    j = 2 * N_AC
    boundary, interior = grid_pairs()
    for feat, pairs in ((BOUNDARY, boundary), (INTERIOR, interior)):
        n_diffs = 2 * PATCH * len(pairs)
        for axis in (0, 1):
            b_ax = basis if axis == 0 else basis.transpose(0, 2, 1)   # rows, then columns
            for r in range(PATCH):
                for a, b in pairs:
                    row = np.zeros((h,), np.float32)
                    row[:N_AC] = b_ax[:, r, a] - b_ax[:, r, b]
                    for sign in (1.0, -1.0):
                        gate[j] = sign * s * row
                        up[j, lay["const"]] = 1.0 / y_const
                        down[lay["bands"] + feat, j] = 1.0 / (s * y_gain * n_diffs)
                        j += 1
    w[b0 + "mlp.gate_proj.weight"] = gate
    w[b0 + "mlp.gate_proj.bias"] = np.zeros((inter,), np.float32)
    w[b0 + "mlp.up_proj.weight"] = up
    w[b0 + "mlp.up_proj.bias"] = np.zeros((inter,), np.float32)
    w[b0 + "mlp.down_proj.weight"] = down
    w[b0 + "mlp.down_proj.bias"] = np.zeros((h,), np.float32)

    # Block 1's MLP: a log of each band energy, as a sum of ramps over octave pairs — band
    # amplitudes span ~3 decades across photos and distortions, and log energies are what
    # classic quality models regress on (a linear read-out of log energies generalises best).
    b1 = "vision_tower.blocks.1."
    gate = np.zeros((inter, h), np.float32)
    gbias = np.zeros((inter,), np.float32)
    up = np.zeros((inter, h), np.float32)
    down = np.zeros((h, inter), np.float32)
    j = 0
    for band in range(N_FEAT):
        for t in LOG_RAMPS:
            ty = t * y_gain                           # threshold in normalised units
            sharp = 2.0 / ty
            for start, sign in ((ty, 1.0), (4 * ty, -1.0)):
                gate[j, lay["bands"] + band] = sharp
                gbias[j] = -sharp * start
                up[j, lay["const"]] = 1.0 / y_const
                down[lay["log"] + band, j] = sign / (sharp * 3 * ty)
                j += 1
    w[b1 + "mlp.gate_proj.weight"] = gate
    w[b1 + "mlp.gate_proj.bias"] = gbias
    w[b1 + "mlp.up_proj.weight"] = up
    w[b1 + "mlp.up_proj.bias"] = np.zeros((inter,), np.float32)
    w[b1 + "mlp.down_proj.weight"] = down
    w[b1 + "mlp.down_proj.bias"] = np.zeros((h,), np.float32)
    _identity_branches(w, 1, h, inter, "attn.proj")

    # Block 2's attention: every patch gets the image's log-band amplitudes pooled twice — over
    # its most textured patches and over its flattest. One patch's spectrum mostly reflects its
    # content and a plain image mean mixes content with quality (a smooth sky looks like blur);
    # the sharpest patches say how much detail survived (blur), the flattest how much grain and
    # blocking sits where the photo has none (noise, JPEG). The language model need not learn to
    # pool it from 16 noisy tokens.
    if h % _HEAD or h // _HEAD != int(vision_cfg["num_heads"]):
        raise ValueError(f"the DCT stem needs {_HEAD}-wide attention heads (num_heads = hidden "
                         f"/ {_HEAD}; got hidden {h}, {vision_cfg['num_heads']} heads)")
    b2 = "vision_tower.blocks.2."
    qkv = np.zeros((3 * h, h), np.float32)
    qkv_bias = np.zeros((3 * h,), np.float32)
    proj = np.zeros((h, h), np.float32)
    # The outputs are centred (the ramps' mid-range, a design constant) so that what varies
    # between images is not a small ripple on a large common vector, and the blockiness pair is
    # given as its log ratio log(B / I) — the part that is specific to blocking — amplified.
    pbias = np.zeros((h,), np.float32)
    heads_per_pool = -(-N_FEAT // _HEAD)
    # score_j = scale * q . k_j with q = 1 on the slow rotary dim (rotary turns it by < 0.01 rad
    # over a 112-px image: position-free) and k_j = sign * sharpness * texture_j / scale.
    k_gain = POOL_SHARPNESS * np.sqrt(_HEAD) / (TEXTURE_BANDS * y_gain)
    for p_i, sign in enumerate(POOLS):
        out0 = lay["global"] + p_i * N_FEAT
        for hd in range(p_i * heads_per_pool, (p_i + 1) * heads_per_pool):
            qkv_bias[hd * _HEAD + _SLOW_ROTARY] = 1.0
            qkv[h + hd * _HEAD + _SLOW_ROTARY, lay["log"]:lay["log"] + TEXTURE_BANDS] = (
                sign * k_gain)
        for band in range(N_FEAT):
            # v = the log channel as the block's norm1 sees it; proj undoes the norm's gain
            v = p_i * heads_per_pool * _HEAD + band
            qkv[2 * h + v, lay["log"] + band] = 1.0
            if band == BOUNDARY:
                proj[out0 + band, v] = BLOCK_GAIN / y_gain
                proj[out0 + band, v - BOUNDARY + INTERIOR] = -BLOCK_GAIN / y_gain
            else:
                proj[out0 + band, v] = 1.0 / y_gain
                pbias[out0 + band] = -LOG_CENTRE
    w[b2 + "attn.qkv.weight"] = qkv
    w[b2 + "attn.qkv.bias"] = qkv_bias
    w[b2 + "attn.proj.weight"] = proj
    w[b2 + "attn.proj.bias"] = pbias
    _identity_branches(w, 2, h, inter, "mlp.down_proj")

    # Later blocks: identity at init (zero output projections); their inputs stay random.
    for i in range(3, depth):
        _identity_branches(w, i, h, inter, "attn.proj", "mlp.down_proj")

    # Merger: its first linear reads only the pooled log-band channels (content coefficients
    # would swamp them), with a fixed random draw.
    rng = np.random.default_rng(0)
    m_in = 4 * h
    keep = np.zeros((h,), bool)
    keep[lay["global"]:lay["global"] + N_GLOBAL] = True
    fan_in = 4 * N_GLOBAL
    w1 = rng.uniform(-1, 1, (m_in, m_in)).astype(np.float32) / np.sqrt(fan_in)
    mask = np.tile(keep, 4)
    w1[:, ~mask] = 0.0
    w["vision_tower.merger.mlp.0.weight"] = w1
    w["vision_tower.merger.mlp.0.bias"] = np.zeros((m_in,), np.float32)
    w["vision_tower.merger.mlp.2.weight"] = (
        rng.uniform(-1, 1, (out_h, m_in)).astype(np.float32) / np.sqrt(m_in))
    return w


def build_student(out_dir, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                  vocab_size: int = 640, vision_hidden: int = 64, vision_depth: int = 2,
                  vision_stem: str = "random"):
    """The miniature's student: the product's tiny random Qwen2.5-VL
    (`qponder_mlx.testing.build_tiny_model`), with `vision_stem="dct"` the fixed DCT-energy stem
    above written into its vision tower (needs vision_hidden >= 308 in 16-wide heads, e.g. 320,
    and vision_depth >= 3). The random draw is the same as the plain model's: every other weight
    is the tiny model's own for that seed."""
    import json
    from pathlib import Path

    import mlx.core as mx

    from qponder_mlx.testing import build_tiny_model

    if vision_stem not in ("random", "dct"):
        raise ValueError(f"vision_stem={vision_stem!r}: use 'random' or 'dct'")
    inter = None if vision_stem == "random" else max(2 * vision_hidden, STEM_MIN_INTERMEDIATE)
    out = build_tiny_model(out_dir, seed=seed, hidden_size=hidden_size, num_layers=num_layers,
                           vocab_size=vocab_size, vision_hidden=vision_hidden,
                           vision_depth=vision_depth, vision_intermediate=inter)
    if vision_stem == "dct":
        out = Path(out)
        stem = dct_stem_weights(json.loads((out / "config.json").read_text())["vision_config"])
        path = out / "model.safetensors"
        weights = dict(mx.load(str(path)))
        for k, v in stem.items():
            if weights[k].shape != v.shape:
                raise AssertionError(f"stem weight {k}: {v.shape} vs model {weights[k].shape}")
            weights[k] = mx.array(v)
        mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})
    return out

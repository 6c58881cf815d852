"""`qponder.json`: what an app needs besides the weights, and the checksums that protect both.

The manifest lists the sha256 and size of every other file in the bundle. The manifest itself is
protected by `qponder.json.sha256`, one line in `sha256sum` format over qponder.json's exact
bytes, so any tool can check it (`shasum -a 256 -c qponder.json.sha256`, CryptoKit's SHA256 in an
app) without re-serialising JSON. This is integrity (a corrupted, truncated or hand-edited
bundle is refused), not authenticity: anyone who edits the manifest can also rewrite the
checksum line. Signing is the app's code signature's job.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from qponder_mlx.generate import SamplingConfig
from qponder_mlx.images import PixelPolicy
from qponder_mlx.io import atomic_write_bytes
from qponder_mlx.io import file_sha256 as sha256_file
from qponder_mlx.prompts import (
    FAST_ANSWER_PREFIX,
    PARSE_RULE,
    PROMPT_VERSION,
    SCORE_MAX,
    SCORE_MIN,
    SYSTEM_PROMPT,
    USER_PROMPT,
    chat_messages,
)

FORMAT = "qponder-bundle"
FORMAT_VERSION = 1
MANIFEST = "qponder.json"
MANIFEST_SHA = "qponder.json.sha256"


def bundle_files(folder: Path) -> list[str]:
    """Every file under `folder` as a POSIX relative path, sorted; the manifest pair excluded."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if rel not in (MANIFEST, MANIFEST_SHA):
                out.append(rel)
    return sorted(out)


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, size}} of every file the manifest protects."""
    return {rel: {"sha256": sha256_file(folder / rel), "size": (folder / rel).stat().st_size}
            for rel in bundle_files(folder)}


def weights_digest(files: dict[str, dict[str, Any]]) -> str:
    """One hash of the whole file table: same files, same digest (the bundle's identity)."""
    text = json.dumps({k: files[k]["sha256"] for k in sorted(files)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def prompt_section() -> dict:
    return {
        "version": PROMPT_VERSION,
        "system": SYSTEM_PROMPT,
        "user": USER_PROMPT,
        # The exact chat the model was trained on; the bundle's chat template renders it.
        "messages": chat_messages(USER_PROMPT, SYSTEM_PROMPT),
    }


def response_section() -> dict:
    return {
        "format": "<think>reasoning</think><answer>X.XX</answer>",
        "parse_rule": PARSE_RULE,
        "score_range": [SCORE_MIN, SCORE_MAX],
    }


def generation_section() -> dict:
    s = SamplingConfig()
    return {
        "reason": {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
                   "stop_tokens": ["<|im_end|>", "<|endoftext|>"],
                   "banned_tokens": ["<|image_pad|>", "<|video_pad|>", "<|vision_pad|>"]},
        "fast": {"answer_prefix": FAST_ANSWER_PREFIX, "digit_tokens": ["1", "2", "3", "4", "5"],
                 "score": "append answer_prefix to the rendered prompt, run one forward pass, "
                          "softmax the next-token logits over the five digit tokens only; "
                          "score = sum(p_d * d) for d = 1..5"},
    }


def pixels_section(policy: PixelPolicy) -> dict:
    return {
        "min_pixels": policy.min_pixels, "max_pixels": policy.max_pixels,
        "factor": policy.factor,
        "resize": "decode to RGB (EXIF orientation applied, alpha on white), then resize with "
                  "bicubic to Qwen2.5-VL smart_resize(height, width, factor, min_pixels, "
                  "max_pixels): each side rounded to a multiple of factor, area scaled into "
                  "[min_pixels, max_pixels]",
        "image_tokens": "(height / factor) * (width / factor)",
        # Also written into the bundle's preprocessor_config.json (min_pixels, max_pixels), so
        # stock loaders apply the same budget to images that were not resized first.
        "preprocessor_config": "min_pixels and max_pixels set to this policy",
    }


def canonical_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode()


def write_manifest(folder: Path, manifest: dict) -> str:
    """Write qponder.json and its checksum line (each atomically); returns the sha256."""
    data = canonical_bytes(manifest)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(folder / MANIFEST, data)
    atomic_write_bytes(folder / MANIFEST_SHA, f"{digest}  {MANIFEST}\n".encode())
    return digest


def read_checksum_line(path: Path) -> str | None:
    """The hex digest of a `sha256sum` line, or None if the line is malformed."""
    parts = path.read_text(encoding="utf-8", errors="replace").split()
    if len(parts) != 2 or parts[1] != MANIFEST or len(parts[0]) != 64:
        return None
    try:
        int(parts[0], 16)
    except ValueError:
        return None
    return parts[0].lower()

"""Load a Qwen2.5-VL (repo id or folder, optional LoRA adapter) through mlx-vlm."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "mlx-community/Qwen2.5-VL-3B-Instruct-4bit"


class ModelLoadError(RuntimeError):
    """A model or adapter could not be loaded; the message says which and how to fix it."""


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    source: str  # what the user passed (repo id or folder)
    path: Path  # the local folder the weights came from
    adapter: Path | None
    identity: str  # stable fingerprint of base + adapter, keys result stores

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def _file_fingerprint(path: Path, h: hashlib._Hash) -> None:
    # Size plus the first and last MiB: weight files differ there whenever their values do in
    # practice (the safetensors header and the last tensors), at a fraction of a full hash.
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())


def fingerprint(model_dir: Path, adapter: Path | None = None) -> str:
    """A short hash of a model folder's config and weights (and adapter files, if any)."""
    h = hashlib.sha256()
    for name in ("config.json",):
        if (model_dir / name).exists():
            h.update((model_dir / name).read_bytes())
    for wf in sorted(model_dir.glob("*.safetensors")):
        _file_fingerprint(wf, h)
    if adapter is not None:
        for af in sorted(adapter.glob("adapter*")):
            h.update(af.read_bytes())
    return h.hexdigest()[:16]


def resolve_model_path(model: str) -> Path:
    """A local folder as is; a repo id through the Hugging Face cache (downloads on first use)."""
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p}: not a model folder (no config.json) — pass a model "
                                 "folder or a Hugging Face repo id")
        return p.resolve()
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"{model}: no such folder, and not a repo id of the form "
                             "owner/name — check the path")
    from mlx_vlm.utils import get_model_path

    try:
        return Path(get_model_path(model))
    except Exception as e:  # hub errors come in many types: name the real cause
        from qponder_mlx.hub_errors import describe

        raise ModelLoadError(describe(model, e)) from None


def load_model(model: str, adapter: str | Path | None = None) -> LoadedModel:
    """Load model (+ adapter in mlx-vlm's format) with stock `mlx_vlm.load`."""
    from mlx_vlm import load

    path = resolve_model_path(model)
    adapter_path = None
    if adapter is not None:
        adapter_path = Path(adapter).expanduser().resolve()
        if not (adapter_path / "adapter_config.json").exists():
            raise ModelLoadError(f"{adapter_path}: no adapter_config.json — pass the folder "
                                 "that holds adapters.safetensors and adapter_config.json")
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") not in ("qwen2_5_vl", "qwen2_vl"):
        raise ModelLoadError(f"{path}/config.json: model_type {config.get('model_type')!r} is "
                             "not a Qwen2.5-VL — qponder supports qwen2_5_vl (and qwen2_vl)")
    m, processor = load(str(path), adapter_path=str(adapter_path) if adapter_path else None)
    # mlx-vlm falls back silently to a text-only processor when the image processor fails to
    # load; scoring would then die much later with a confusing error.
    if getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(f"{path}: no image processor could be loaded — the folder needs "
                             "preprocessor_config.json")
    return LoadedModel(m, processor, model, path, adapter_path, fingerprint(path, adapter_path))

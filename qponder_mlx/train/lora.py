"""LoRA / QLoRA on the language model, saved in the format stock mlx-vlm loads.

The layers are mlx-vlm's own (`LoRALinear` via `get_peft_model`), and `adapter_config.json`
is the dict mlx-vlm records, so `mlx_vlm.load(base, adapter_path=dir)` and
`mlx_vlm.server --adapter-path dir` rebuild exactly this model:

    {"fine_tune_type": "lora", "num_layers": -1,
     "lora_parameters": {"rank": r, "dropout": p, "scale": alpha / r, "keys": [full names]},
     "base_quantization": {layer name: {"group_size", "bits", "mode"}}   # QLoRA only}

What mlx-vlm lacks and lives here: QLoRA that quantizes only the language model (mlx-vlm's
in-memory path also quantizes vision-tower linears), atomic adapter saves, strict weight loading,
and `adapters_disabled`, which turns a LoRA model back into its base for a KL reference without a
second copy of the weights.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from qponder_mlx.io import atomic_write_json
from qponder_mlx.train.config import LoraConfig

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LANGUAGE_PREFIX = "language_model."


class AdapterError(ValueError):
    """An adapter that cannot be attached or loaded; the message is one line."""


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every LoRA-style layer (mlx-vlm's LoRALinear, DoRA, switch variants)."""
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "lora_a") and hasattr(m, "scale")]


def base_quantization(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{layer name: {group_size, bits, mode}} of every quantized layer (mlx-vlm's format)."""
    return {name: {"group_size": m.group_size, "bits": m.bits,
                   "mode": getattr(m, "mode", "affine")}
            for name, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


def quantize_language_model(model: nn.Module, bits: int, group_size: int = 64) -> int:
    """Quantize the language model's Linear and Embedding layers in place (QLoRA base).

    The vision tower stays in float: it is small, frozen, and its errors would reach every image
    token. Layers whose input width is not a multiple of `group_size` stay float too (mlx needs
    whole groups). Returns the number of layers quantized.
    """
    if base_quantization(model):
        raise AdapterError("the base model is already quantized — drop quantize_base (LoRA on a "
                           "quantized base is QLoRA already)")
    count = 0

    def predicate(path: str, m: nn.Module) -> bool:
        nonlocal count
        ok = (path.startswith(LANGUAGE_PREFIX) and isinstance(m, (nn.Linear, nn.Embedding))
              and m.weight.shape[-1] % group_size == 0)
        count += ok
        return ok

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    if count == 0:
        raise AdapterError(f"no language-model layer has a width divisible by group size "
                           f"{group_size} — use a smaller quantize_group_size")
    return count


def _record(model: nn.Module, config: dict) -> None:
    # Where mlx-vlm keeps it, so its own save/fuse helpers see the same config.
    model._vlm_adapter_config = config
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict):
        cfg["lora"] = config
    elif cfg is not None:
        cfg.lora = config


def attach_lora(model: nn.Module, lora: LoraConfig, *, quantize_bits: int | None = None,
                group_size: int = 64) -> dict:
    """Freeze the model, optionally quantize its language model, wrap target linears in LoRA.

    Seed `mx.random` first: the LoRA A matrices are drawn from the global RNG. Returns the
    adapter config (also recorded on the model) that `save_adapters` writes.
    """
    from mlx_vlm.trainer.peft import get_peft_model

    lora.validate()
    if lora_layers(model):
        raise AdapterError("the model already has LoRA layers — load a fresh base model")
    if quantize_bits is not None:
        quantize_language_model(model, quantize_bits, group_size)
    # Names as in the base model (before LoRA wraps them in `.linear`): mlx-vlm re-quantizes
    # exactly these layers of a float base when it loads the adapter.
    quant = base_quantization(model)
    try:
        get_peft_model(model, list(lora.target_modules), rank=lora.rank, alpha=lora.alpha,
                       dropout=lora.dropout, freeze=True, verbose=False)
    except ValueError as e:
        raise AdapterError(f"lora.target_modules {lora.target_modules}: "
                           f"{str(e).splitlines()[0][:300]}") from None
    config = dict(model._vlm_adapter_config)
    if quant:
        config["base_quantization"] = quant
    if lora.train_vision:
        model.vision_tower.unfreeze()
        config["train_vision"] = True
    elif lora.train_merger:
        model.vision_tower.merger.unfreeze()
        config["train_merger"] = True
    _record(model, config)
    return config


def load_adapters(model: nn.Module, adapter_dir: str | Path, *,
                  train_vision: bool = False) -> dict:
    """Attach a saved adapter to a fresh base (stock mlx-vlm code path); LoRA stays trainable.

    Used to continue from an SFT adapter (GRPO `--adapter`). Returns the adapter config.
    """
    from mlx_vlm.trainer.peft import apply_lora_layers

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).exists() or not (adapter_dir / ADAPTER_WEIGHTS).exists():
        raise AdapterError(f"{adapter_dir}: needs {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG} — pass "
                           "the folder a training run wrote (run/adapters)")
    if lora_layers(model):
        raise AdapterError("the model already has LoRA layers — load a fresh base model")
    try:
        apply_lora_layers(model, adapter_dir)
    except (ValueError, FileNotFoundError) as e:
        raise AdapterError(f"{adapter_dir}: {' '.join(str(e).split())[:300]}") from None
    config = dict(model._vlm_adapter_config)
    if train_vision or config.get("train_vision"):
        model.vision_tower.unfreeze()
    elif config.get("train_merger"):
        model.vision_tower.merger.unfreeze()
    _record(model, config)
    return config


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The trainable tensors by full name: exactly what adapters.safetensors holds."""
    return dict(tree_flatten(model.trainable_parameters()))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems refuse to open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_safetensors_atomic(path: Path, arrays: dict[str, mx.array],
                            metadata: dict[str, str] | None = None) -> None:
    """mx.save_safetensors to a temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata=metadata or {})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_adapters(weights: dict[str, mx.array], config: dict, out_dir: str | Path) -> Path:
    """Write adapters.safetensors + adapter_config.json (mlx-vlm's format), each atomically.

    The config goes first: it only changes between runs, so a crash between the two renames
    leaves a consistent pair.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / ADAPTER_CONFIG, config)
    save_safetensors_atomic(out / ADAPTER_WEIGHTS, weights, metadata={"format": "mlx"})
    return out


def save_adapters(model: nn.Module, config: dict, out_dir: str | Path) -> Path:
    """The model's own trainable weights as an adapter folder (`write_adapters`)."""
    return write_adapters(adapter_weights(model), config, out_dir)


def load_adapter_weights(model: nn.Module, path: str | Path) -> None:
    """Load saved trainable weights into an already-prepared model, refusing any mismatch.

    (`model.load_weights(strict=False)` would silently skip a renamed or reshaped tensor.)
    """
    saved = mx.load(str(path))
    have = adapter_weights(model)
    missing = sorted(set(have) - set(saved))
    extra = sorted(set(saved) - set(have))
    if missing or extra:
        name = (missing or extra)[0]
        raise AdapterError(f"{path}: adapter tensors do not match this model ({len(missing)} "
                           f"missing, {len(extra)} unexpected, e.g. {name}) — same model and "
                           "lora settings as the run that saved it?")
    for k, v in saved.items():
        if v.shape != have[k].shape:
            raise AdapterError(f"{path}: {k} has shape {v.shape}, the model wants "
                               f"{have[k].shape} — same lora.rank as the saved run?")
    model.update(tree_unflatten(list(saved.items())))
    mx.eval(model.trainable_parameters())


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every LoRA layer returns its base output only (scale 0).

    `y + 0 * z` is exactly `y` for finite z, so logits equal the base model's bit for bit; the
    GRPO KL reference uses this instead of a second model copy. The scales come back on exit,
    also after an exception.
    """
    layers = lora_layers(model)
    saved = [m.scale for _, m in layers]
    try:
        for _, m in layers:
            m.scale = 0.0
        yield model
    finally:
        for (_, m), s in zip(layers, saved):
            m.scale = s


@contextmanager
def weights_swapped(model: nn.Module, weights: dict[str, mx.array]) -> Iterator[nn.Module]:
    """Inside the block the model's trainable weights are `weights` (a snapshot taken with
    `trainable_snapshot`); the current ones come back on exit, also after an exception.

    GRPO's KL reference is the policy as the run started (TRL's reference model). After a cold
    start that is the SFT adapter, which `adapters_disabled` (the bare base) is not; swapping a
    few MB of adapter weights costs nothing next to a second model copy.
    """
    current = dict(tree_flatten(model.trainable_parameters()))
    if current.keys() != weights.keys():
        raise ValueError("weight snapshot does not match the model's trainable parameters")
    try:
        model.update(tree_unflatten(list(weights.items())))
        yield model
    finally:
        model.update(tree_unflatten(list(current.items())))


def trainable_snapshot(model: nn.Module) -> dict[str, mx.array]:
    """The trainable weights as they are now (MLX arrays are immutable: no copy is needed)."""
    return dict(tree_flatten(model.trainable_parameters()))

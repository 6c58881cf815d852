"""Would MLX Swift load this bundle? Its Qwen2.5-VL loader's requirements, checked in Python.

Read from ml-explore/mlx-swift-lm at tag 3.31.4 (commit bd4b7434e6bdb588c7ef55706ff8904cb7fd4c57;
the configuration structs are unchanged at 14414441, 2026-12): the files are named beside each
table below, and docs/export.md has them as a requirement table. Nothing here runs Swift; it
applies the rules those sources encode, so a bundle that fails here fails there (or uses what
the check does not vouch for: a quantization mode other than affine and mxfp4, a model type
other than qwen2_5_vl and qwen2_vl), and one that passes has the keys, types, tensor names and
shapes its loader asks for — not proven to run.

* Libraries/MLXVLM/Models/Qwen25VL.swift — `Qwen25VLConfiguration` decodes config.json three
  times: `TextConfiguration` and `BaseConfiguration` from the root, `VisionConfiguration` from
  `vision_config`. A non-optional property is a required key; an optional one may be absent but
  must have the right type when present. `Qwen25VLProcessorConfiguration` decodes
  preprocessor_config.json the same way. Libraries/MLXVLM/Models/Qwen2VL.swift does the same
  for `qwen2_vl` (`Qwen2VLConfiguration`, `Qwen2VLProcessorConfiguration`).
* Libraries/MLXVLM/VLMModelFactory.swift — `model_type` picks the model (`qwen2_5_vl`), the
  preprocessor_config.json's `processor_class` picks the processor; the tokenizer loads from the
  bundle folder.
* Libraries/MLXLMCommon/BaseConfiguration.swift — `quantization`: `group_size` and `bits`
  (required ints), `mode` (optional); every other key is a per-layer entry: `false` or an
  object with `group_size` and `bits`.
* Libraries/MLXLMCommon/Load.swift — every `*.safetensors` under the folder (recursively) is
  loaded; `sanitize` renames and drops keys; a layer is quantized when `<path>.scales` exists;
  `update(parameters:verify: .all)` then demands exactly the model's parameter names with the
  model's shapes: a missing, extra or mis-shaped tensor is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from .safetensors_header import HeaderError, read_header

SWIFT_SOURCE = {
    "repo": "ml-explore/mlx-swift-lm",
    "library": "MLXVLM",
    "min_version": "3.31.4",
    "commit": "bd4b7434e6bdb588c7ef55706ff8904cb7fd4c57",
    "files": ["Libraries/MLXVLM/Models/Qwen25VL.swift", "Libraries/MLXVLM/Models/Qwen2VL.swift",
              "Libraries/MLXVLM/Models/QwenVL.swift",
              "Libraries/MLXVLM/VLMModelFactory.swift",
              "Libraries/MLXLMCommon/BaseConfiguration.swift",
              "Libraries/MLXLMCommon/Load.swift"],
}

INT, FLOAT, BOOL, STR, INTS, OBJ, FLOATS = ("int", "number", "bool", "string", "int list",
                                            "object", "number list")

# Qwen25VL.swift, Qwen25VLConfiguration.TextConfiguration + BaseConfiguration (both root-level).
ROOT_REQUIRED = {
    "model_type": STR, "hidden_size": INT, "num_hidden_layers": INT, "intermediate_size": INT,
    "num_attention_heads": INT, "vocab_size": INT, "num_key_value_heads": INT,
    "image_token_id": INT, "video_token_id": INT, "vision_start_token_id": INT,
    "vision_end_token_id": INT, "vision_token_id": INT,
    "sliding_window": INT, "use_sliding_window": BOOL, "max_window_layers": INT,
    "vision_config": OBJ,
}
ROOT_OPTIONAL = {
    "rms_norm_eps": FLOAT, "max_position_embeddings": INT, "rope_theta": FLOAT,
    "rope_traditional": BOOL, "rope_scaling": OBJ, "tie_word_embeddings": BOOL,
}
# Qwen25VLConfiguration.VisionConfiguration.
VISION_REQUIRED = {
    "depth": INT, "hidden_size": INT, "intermediate_size": INT, "out_hidden_size": INT,
    "num_heads": INT, "patch_size": INT, "spatial_patch_size": INT, "spatial_merge_size": INT,
    "temporal_patch_size": INT, "window_size": INT, "fullatt_block_indexes": INTS,
    "tokens_per_second": INT,
}
VISION_OPTIONAL = {"in_chans": INT, "layer_norm_eps": FLOAT, "skip_vision": BOOL,
                   "hidden_act": STR}
# Qwen2VL.swift, Qwen2VLConfiguration: fewer root keys, another vision tower (embed_dim,
# mlp_ratio; hidden_size there is the language model's width).
QWEN2VL_ROOT_REQUIRED = {
    "model_type": STR, "hidden_size": INT, "num_hidden_layers": INT, "intermediate_size": INT,
    "num_attention_heads": INT, "vocab_size": INT, "num_key_value_heads": INT,
    "image_token_id": INT, "video_token_id": INT, "vision_config": OBJ,
}
QWEN2VL_VISION_REQUIRED = {
    "depth": INT, "embed_dim": INT, "hidden_size": INT, "num_heads": INT, "patch_size": INT,
    "mlp_ratio": FLOAT, "spatial_patch_size": INT, "spatial_merge_size": INT,
    "temporal_patch_size": INT,
}
QWEN2VL_VISION_OPTIONAL = {"in_channels": INT, "layer_norm_eps": FLOAT}
# model_type -> (root required, vision required, vision optional)
MODEL_TABLES = {
    "qwen2_5_vl": (ROOT_REQUIRED, VISION_REQUIRED, VISION_OPTIONAL),
    "qwen2_vl": (QWEN2VL_ROOT_REQUIRED, QWEN2VL_VISION_REQUIRED, QWEN2VL_VISION_OPTIONAL),
}
MODEL_TYPES = tuple(MODEL_TABLES)

# BaseProcessorConfiguration (VLMModelFactory.swift) + the processor `processor_class` names:
# Qwen25VLProcessorConfiguration requires every key; Qwen2VLProcessorConfiguration falls back to
# `size` and to Qwen's defaults for min_pixels / max_pixels.
PROCESSOR_TABLES = {
    "Qwen2_5_VLProcessor": ({
        "processor_class": STR, "image_mean": FLOATS, "image_std": FLOATS, "min_pixels": INT,
        "max_pixels": INT, "merge_size": INT, "patch_size": INT, "temporal_patch_size": INT,
        "image_processor_type": STR}, {}),
    "Qwen2VLProcessor": ({
        "processor_class": STR, "image_mean": FLOATS, "image_std": FLOATS, "merge_size": INT,
        "patch_size": INT, "temporal_patch_size": INT},
        {"min_pixels": INT, "max_pixels": INT, "size": OBJ}),
}
PROCESSOR_REQUIRED = PROCESSOR_TABLES["Qwen2_5_VLProcessor"][0]
PROCESSOR_CLASSES = tuple(PROCESSOR_TABLES)

# MLX's quantizer (mlx-swift wraps the same core): affine packs these bits at these group sizes.
# Affine at 4 bits is what mlx-community's Qwen2.5-VL checkpoints use, the tested path; mxfp4
# decodes (mode "mxfp4") but nothing in mlx-swift-lm's tests loads a Qwen2.5-VL in it.
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
MODES = {"affine": None, "mxfp4": (32, 4)}
UNVERIFIED_MODES = ("mxfp4",)
# Keys BaseConfiguration.QuantizationContainer skips rather than reading as a layer.
QUANT_NON_LAYER_KEYS = ("group_size", "bits", "mode", "quant_method", "linear_class",
                        "quantization_mode")

# Tokenizer: MLXHuggingFace's loader calls swift-transformers' AutoTokenizer.from(modelFolder:),
# which reads tokenizer.json and tokenizer_config.json (no vocab.json/merges.txt fallback).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class SwiftCompatError(ValueError):
    """The bundle would not load in MLX Swift; one line naming the key, tensor or file."""


def _type_ok(value, kind: str) -> bool:
    # Swift's JSONDecoder: Int rejects 1.5 and true; Float takes 1 or 1.5; Bool only true/false.
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == INT:
        return is_int
    if kind == FLOAT:
        return is_int or isinstance(value, float)
    if kind == BOOL:
        return isinstance(value, bool)
    if kind == STR:
        return isinstance(value, str)
    if kind == OBJ:
        return isinstance(value, dict)
    if kind == INTS:
        return isinstance(value, list) and all(_type_ok(v, INT) for v in value)
    if kind == FLOATS:
        return isinstance(value, list) and all(_type_ok(v, FLOAT) for v in value)
    raise ValueError(kind)


def _check_keys(cfg: dict, required: dict, optional: dict, where: str) -> list[str]:
    out = []
    for key, kind in required.items():
        if key not in cfg or cfg[key] is None:
            out.append(f"{where}: key {key!r} ({kind}) is missing — MLX Swift's loader requires "
                       "it")
        elif not _type_ok(cfg[key], kind):
            out.append(f"{where}: key {key!r} is {cfg[key]!r}, MLX Swift decodes it as {kind}")
    for key, kind in optional.items():
        if cfg.get(key) is not None and not _type_ok(cfg[key], kind):
            out.append(f"{where}: key {key!r} is {cfg[key]!r}, MLX Swift decodes it as {kind}")
    return out


def check_config(config: dict, where: str = "config.json") -> list[str]:
    """Problems MLX Swift's Qwen25VLConfiguration (Qwen2VLConfiguration for qwen2_vl) would
    have decoding `config`."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TABLES:
        return [f"{where}: model_type {model_type!r} — MLX Swift's check here knows "
                f"{', '.join(MODEL_TYPES)}"]
    root, vision_required, vision_optional = MODEL_TABLES[model_type]
    out = _check_keys(config, root, ROOT_OPTIONAL, where)
    vision = config.get("vision_config")
    if isinstance(vision, dict):
        out += _check_keys(vision, vision_required, vision_optional, f"{where} vision_config")
    rope = config.get("rope_scaling")
    # validateMROPESection (RoPEUtils.swift): three positive ints; without it Attention's init
    # stops the app (fatalError), so it is required in practice.
    section = rope.get("mrope_section") if isinstance(rope, dict) else None
    if not (_type_ok(section, INTS) and len(section) == 3 and all(s > 0 for s in section)):
        out.append(f"{where}: rope_scaling.mrope_section is {section!r} — MLX Swift needs three "
                   "positive ints")
    elif isinstance(rope, dict):
        for k, v in rope.items():  # [String: StringOrNumber]: strings, numbers, number lists
            if not (isinstance(v, (str, int, float)) or _type_ok(v, FLOATS)):
                out.append(f"{where}: rope_scaling.{k} is {v!r}, not a string, number or list")
    if "quantization" in config:
        out += check_quantization(config["quantization"], where)
    return out


def check_quantization(q, where: str = "config.json") -> list[str]:
    """Problems with a `quantization` block (BaseConfiguration.QuantizationContainer)."""
    if not isinstance(q, dict):
        return [f"{where}: quantization is {q!r}, MLX Swift decodes an object"]
    out = []
    for key in ("group_size", "bits"):
        if not _type_ok(q.get(key), INT):
            out.append(f"{where}: quantization.{key} is {q.get(key)!r}, MLX Swift needs an int")
    mode = q.get("mode", "affine")
    if mode not in MODES:
        out.append(f"{where}: quantization.mode {mode!r} — MLX Swift reads "
                   f"{', '.join(MODES)}")
    elif out:
        return out
    elif mode == "affine":
        if q["bits"] not in AFFINE_BITS or q["group_size"] not in GROUP_SIZES:
            out.append(f"{where}: quantization bits {q['bits']} / group_size {q['group_size']} — "
                       f"MLX affine packs bits {AFFINE_BITS} at group sizes {GROUP_SIZES}")
    elif (q["group_size"], q["bits"]) != MODES[mode]:
        out.append(f"{where}: {mode} needs group_size {MODES[mode][0]} and bits "
                   f"{MODES[mode][1]}")
    for key, value in q.items():
        if key in QUANT_NON_LAYER_KEYS or value is False:
            continue
        if not (isinstance(value, dict) and _type_ok(value.get("group_size"), INT)
                and _type_ok(value.get("bits"), INT)):
            out.append(f"{where}: quantization.{key} is {value!r} — a per-layer entry must be "
                       "false or {group_size, bits}")
    return out


def check_preprocessor(pp: dict, where: str = "preprocessor_config.json") -> list[str]:
    cls = pp.get("processor_class")
    if cls is not None and cls not in PROCESSOR_TABLES:
        return [f"{where}: processor_class {cls!r} — MLX Swift's Qwen processors are "
                f"{', '.join(PROCESSOR_CLASSES)}"]
    out = _check_keys(pp, *PROCESSOR_TABLES[cls or "Qwen2_5_VLProcessor"], where)
    for key in ("image_mean", "image_std"):
        if _type_ok(pp.get(key), FLOATS) and len(pp[key]) != 3:
            out.append(f"{where}: {key} needs 3 values (RGB), has {len(pp[key])}")
    return out


def expected_weights(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter MLX Swift's Qwen25VL has, with its float shape, by the Swift modules.

    Qwen25VL.swift: the language model (`language_model.model.*`, `language_model.lm_head`
    unless tie_word_embeddings, which defaults to true there) and the vision tower
    (`vision_tower.*`; Conv3d weights in MLX layout (out, t, h, w, in); the merger's MLP is a
    (Linear, GELU, Linear) tuple, so its keys are `mlp.0` and `mlp.2`). Rotary frequencies are
    computed, never loaded.
    """
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = h // heads
    vocab = config["vocab_size"]
    w: dict[str, tuple[int, ...]] = {"language_model.model.embed_tokens.weight": (vocab, h),
                                     "language_model.model.norm.weight": (h,)}
    for i in range(config["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}"
        w |= {f"{p}.self_attn.q_proj.weight": (heads * hd, h), f"{p}.self_attn.q_proj.bias":
              (heads * hd,), f"{p}.self_attn.k_proj.weight": (kv * hd, h),
              f"{p}.self_attn.k_proj.bias": (kv * hd,), f"{p}.self_attn.v_proj.weight":
              (kv * hd, h), f"{p}.self_attn.v_proj.bias": (kv * hd,),
              f"{p}.self_attn.o_proj.weight": (h, heads * hd),
              f"{p}.mlp.gate_proj.weight": (inter, h), f"{p}.mlp.up_proj.weight": (inter, h),
              f"{p}.mlp.down_proj.weight": (h, inter), f"{p}.input_layernorm.weight": (h,),
              f"{p}.post_attention_layernorm.weight": (h,)}
    if config.get("tie_word_embeddings") is False:
        w["language_model.lm_head.weight"] = (vocab, h)
    v = config["vision_config"]
    if config["model_type"] == "qwen2_vl":
        return w | _qwen2vl_vision(v)
    d, vi = v["hidden_size"], v["intermediate_size"]
    merged = d * v["spatial_merge_size"] ** 2
    w["vision_tower.patch_embed.proj.weight"] = (d, v["temporal_patch_size"], v["patch_size"],
                                                 v["patch_size"], v.get("in_chans") or 3)
    for i in range(v["depth"]):
        p = f"vision_tower.blocks.{i}"
        w |= {f"{p}.norm1.weight": (d,), f"{p}.norm2.weight": (d,),
              f"{p}.attn.qkv.weight": (3 * d, d), f"{p}.attn.qkv.bias": (3 * d,),
              f"{p}.attn.proj.weight": (d, d), f"{p}.attn.proj.bias": (d,),
              f"{p}.mlp.gate_proj.weight": (vi, d), f"{p}.mlp.gate_proj.bias": (vi,),
              f"{p}.mlp.up_proj.weight": (vi, d), f"{p}.mlp.up_proj.bias": (vi,),
              f"{p}.mlp.down_proj.weight": (d, vi), f"{p}.mlp.down_proj.bias": (d,)}
    w |= {"vision_tower.merger.ln_q.weight": (d,),
          "vision_tower.merger.mlp.0.weight": (merged, merged),
          "vision_tower.merger.mlp.0.bias": (merged,),
          "vision_tower.merger.mlp.2.weight": (v["out_hidden_size"], merged),
          "vision_tower.merger.mlp.2.bias": (v["out_hidden_size"],)}
    return w


def _qwen2vl_vision(v: dict) -> dict[str, tuple[int, ...]]:
    """Qwen2VL.swift's vision tower: LayerNorms with bias, an fc1/fc2 MLP of embed_dim x
    mlp_ratio, a merger into the language width (`hidden_size`); `in_channels`, default 3."""
    d, out_dim = v["embed_dim"], v["hidden_size"]
    hidden = int(d * float(v["mlp_ratio"]))
    merged = d * v["spatial_merge_size"] ** 2
    w = {"vision_tower.patch_embed.proj.weight": (d, v["temporal_patch_size"], v["patch_size"],
                                                  v["patch_size"], v.get("in_channels") or 3)}
    for i in range(v["depth"]):
        p = f"vision_tower.blocks.{i}"
        w |= {f"{p}.norm1.weight": (d,), f"{p}.norm1.bias": (d,), f"{p}.norm2.weight": (d,),
              f"{p}.norm2.bias": (d,), f"{p}.attn.qkv.weight": (3 * d, d),
              f"{p}.attn.qkv.bias": (3 * d,), f"{p}.attn.proj.weight": (d, d),
              f"{p}.attn.proj.bias": (d,), f"{p}.mlp.fc1.weight": (hidden, d),
              f"{p}.mlp.fc1.bias": (hidden,), f"{p}.mlp.fc2.weight": (d, hidden),
              f"{p}.mlp.fc2.bias": (d,)}
    return w | {"vision_tower.merger.ln_q.weight": (d,), "vision_tower.merger.ln_q.bias": (d,),
                "vision_tower.merger.mlp.0.weight": (merged, merged),
                "vision_tower.merger.mlp.0.bias": (merged,),
                "vision_tower.merger.mlp.2.weight": (out_dim, merged),
                "vision_tower.merger.mlp.2.bias": (out_dim,)}


def swift_sanitized_name(name: str) -> str | None:
    """A stored tensor name as Qwen25VL.sanitize leaves it; None when sanitize drops it."""
    if "vision_tower" not in name:
        name = name.replace("visual", "vision_tower")
    if "language_model" not in name:
        name = name.replace("model", "language_model.model").replace(
            "lm_head", "language_model.lm_head")
    return None if "position_id" in name else name


def _quantized_shapes(shape: tuple[int, ...], group: int, bits: int,
                      mode: str) -> dict[str, tuple[int, ...]]:
    out_dim, in_dim = shape
    shapes = {"weight": (out_dim, in_dim * bits // 32), "scales": (out_dim, in_dim // group)}
    if mode == "affine":
        shapes["biases"] = (out_dim, in_dim // group)
    return shapes


def check_weights(tensors: dict[str, list[int] | tuple[int, ...]], config: dict) -> list[str]:
    """Compare stored tensor names/shapes with what Swift's `update(verify: .all)` accepts."""
    want = expected_weights(config)
    q = config.get("quantization") or {}
    stored = {}
    for name, shape in tensors.items():
        s = swift_sanitized_name(name)
        if s is not None:
            stored[s] = tuple(shape)
    # Swift transposes a Conv3d weight it does not recognise as MLX layout (last dim 3).
    pe = "vision_tower.patch_embed.proj.weight"
    if pe in stored and len(stored[pe]) == 5 and stored[pe][-1] != 3 and stored[pe][1] == 3:
        s = stored[pe]
        stored[pe] = (s[0], s[2], s[3], s[4], s[1])
    out = []
    expected: dict[str, tuple[int, ...]] = {}
    for name, shape in want.items():
        base = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{base}.scales" in stored and len(shape) == 2:
            layer_q = q.get(base, q)  # a per-layer entry wins; False means "float"
            if layer_q is False:
                out.append(f"tensor {base}.scales: config.json's quantization marks {base} float"
                           " but it is stored quantized")
                continue
            if not layer_q or "bits" not in layer_q:
                out.append(f"tensor {base}.scales: the layer is stored quantized but config.json "
                           "has no quantization block")
                continue
            for part, s in _quantized_shapes(shape, layer_q["group_size"], layer_q["bits"],
                                             layer_q.get("mode", q.get("mode", "affine"))).items():
                expected[f"{base}.{part}"] = s
        else:
            expected[name] = shape
    for name in sorted(expected):
        if name not in stored:
            out.append(f"tensor {name}: missing — MLX Swift's Qwen25VL needs it (shape "
                       f"{list(expected[name])})")
        elif stored[name] != expected[name]:
            out.append(f"tensor {name}: shape {list(stored[name])}, MLX Swift's Qwen25VL expects "
                       f"{list(expected[name])}")
    for name in sorted(set(stored) - set(expected)):
        out.append(f"tensor {name}: MLX Swift's Qwen25VL has no such parameter (its loader "
                   "refuses unused keys)")
    return out


def _tokenizer_problems(folder: Path, names: set[str]) -> list[str]:
    out = [f"{folder / f}: missing — MLX Swift's tokenizer loader (swift-transformers) reads it"
           for f in TOKENIZER_FILES if f not in names]
    if "tokenizer_config.json" in names:
        tok = _read_json(folder / "tokenizer_config.json", out)
        if tok is None:
            return out
        if not isinstance(tok.get("tokenizer_class"), str):
            out.append(f"{folder / 'tokenizer_config.json'}: no tokenizer_class — "
                       "swift-transformers picks the tokenizer by it")
        if not (set(CHAT_TEMPLATE_FILES) & names or "chat_template" in tok):
            out.append(f"{folder}: no chat template (chat_template.jinja, chat_template.json or "
                       "tokenizer_config.json's chat_template)")
    return out


def _read_json(path: Path, out: list[str]) -> dict | None:
    """The JSON object in `path`, or None with a problem line (Swift's decoder would throw)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        out.append(f"{path}: not readable JSON ({type(e).__name__}) — MLX Swift cannot decode it")
        return None
    if not isinstance(value, dict):
        out.append(f"{path}: not a JSON object — MLX Swift cannot decode it")
        return None
    return value


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.safetensors"))


def check_folder(folder: str | Path) -> list[str]:
    """Every reason MLX Swift (mlx-swift-lm >= 3.31.4) would refuse to load `folder`."""
    folder = Path(folder)
    names = {p.name for p in folder.iterdir()}
    out = []
    for name in ("config.json", "preprocessor_config.json"):
        if name not in names:
            out.append(f"{folder / name}: missing — MLX Swift's VLM loader reads it")
    if out:
        return out
    config = _read_json(folder / "config.json", out)
    pp = _read_json(folder / "preprocessor_config.json", out)
    if config is None or pp is None:
        return out
    out += check_config(config)
    out += check_preprocessor(pp)
    out += _tokenizer_problems(folder, names)
    files = _weight_files(folder)
    for f in files:
        if f.parent != folder:
            # Load.swift (3.31.4) enumerates the folder recursively: this would load too.
            out.append(f"{f}: a weight file below the bundle's top level — MLX Swift would "
                       "load it as model weights")
    if not files:
        out.append(f"{folder}: no *.safetensors weights")
    if out:
        return out  # weight names are only meaningful once the config decodes
    tensors: dict[str, list[int]] = {}
    for f in files:
        try:
            tensors |= {k: v["shape"] for k, v in read_header(f).items()}
        except HeaderError as e:
            out.append(str(e))
    return out + check_weights(tensors, config)


def refuse_unless_loadable(folder: str | Path) -> None:
    refuse(check_folder(folder))


def check_base(config: dict, preprocessor: dict | None) -> list[str]:
    """What of the base model's files alone already rules MLX Swift out (before any work)."""
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    out = check_config(config, "the base model's config.json")
    if preprocessor is not None:
        out += check_preprocessor(preprocessor, "the base model's preprocessor_config.json")
    return out


def refuse(problems: list[str]) -> None:
    """Raise SwiftCompatError naming the first problem (and how many more there are)."""
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SwiftCompatError(f"{problems[0]}{more} — the bundle would not load in MLX Swift; "
                               "fix the base model, or pass --target python for a bundle that "
                               "only Python loads")


def unverified(quant_spec: dict | None, quantize_vision: bool) -> list[str]:
    """Settings that pass the checks here but that no MLX Swift test has loaded a Qwen2.5-VL in."""
    out: list[str] = []
    if quant_spec and quant_spec.get("mode") in UNVERIFIED_MODES:
        out.append(f"q_mode {quant_spec['mode']}")
    if quantize_vision:
        out.append("quantize_vision")
    return out


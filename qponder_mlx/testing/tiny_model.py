"""A tiny, deterministic, random Qwen2.5-VL built offline.

Every test and `qponder dev tiny-model` use this instead of a hub download. It is the real
mlx-vlm `qwen2_5_vl` model class with random weights, a byte-level BPE tokenizer trained at build
time (Qwen's pre-tokenizer and special tokens in Qwen's order) and Qwen2.5-VL's chat template,
so every code path (processor, chat template, vision tower, mRoPE, KV cache, LoRA) is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

from qponder_mlx.prompts import SYSTEM_PROMPT, USER_PROMPT

# Qwen2.5-VL's own chat template (chat_template.json of the Qwen/Qwen2.5-VL-*-Instruct repos).
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen2.5): digits are split one by one,
# which is what makes "1".."5" single tokens for the fast scoring mode.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5's added tokens, in Qwen's order (ids follow the BPE vocabulary, as in Qwen).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
NON_SPECIAL_ADDED = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]

_CORPUS_EXTRA = """
The photo is sharp and well focused. The image is blurry, soft and out of focus.
There is visible noise and grain in the shadows. Exposure is balanced; highlights are clipped.
Colours are natural and saturated. Strong JPEG compression causes blocking and ringing artifacts.
The composition is pleasant. Overall the quality is excellent, good, fair, poor or bad.
<think>The image shows mild blur and some noise.</think><answer>3.25</answer>
0 1 2 3 4 5 6 7 8 9 . , : ; ! ? ( ) - + / % 1.00 2.50 3.75 4.20 5.00
"""


def _train_tokenizer(vocab_size: int):
    """Byte-level BPE with Qwen2's pre-tokenizer, wrapped as a Qwen2TokenizerFast."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [SYSTEM_PROMPT, USER_PROMPT, *_CORPUS_EXTRA.strip().splitlines()] * 4
    bpe.train_from_iterator(corpus, trainer=trainer)
    model_json = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    tok = Qwen2TokenizerFast(
        vocab=model_json["vocab"], merges=merges,
        unk_token=None, bos_token=None, eos_token=None, pad_token=None,
        errors="replace", add_prefix_space=False,
    )
    # Added in one call so the ids follow Qwen's order; eos/pad are named only afterwards.
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    tok.add_tokens(NON_SPECIAL_ADDED)
    tok.chat_template = QWEN25VL_CHAT_TEMPLATE
    tok.model_max_length = 32768
    return tok


def tiny_config(vocab_size: int, ids: dict[str, int], *, hidden_size: int, num_layers: int,
                vision_hidden: int = 64, vision_depth: int = 2,
                vision_intermediate: int | None = None) -> dict:
    """Flat HF-layout Qwen2.5-VL config (text keys at the root, as mlx-vlm expects)."""
    heads = max(1, hidden_size // 16)
    head_dim = hidden_size // heads
    half = head_dim // 2
    # mRoPE sections (temporal, height, width) must add up to head_dim / 2.
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope},
        # Required by MLX Swift's Qwen25VLConfiguration (mlx-swift-lm Qwen25VL.swift), values as
        # in Qwen2.5-VL-3B-Instruct's config.json; mlx-vlm ignores them.
        "sliding_window": 32768,
        "use_sliding_window": False,
        "max_window_layers": 70,
        # Untied: with tied random embeddings the model just echoes its last input token.
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": vision_intermediate or vision_hidden * 2,
            "out_hidden_size": hidden_size,
            "num_heads": max(1, vision_hidden // 16),
            "in_chans": 3,
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            "fullatt_block_indexes": [vision_depth - 1],
        },
    }


PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "rescale_factor": 0.00392156862745098,
    "merge_size": 2,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "min_pixels": 3136,
    "max_pixels": 12845056,
}


def build_tiny_model(out_dir: str | Path, *, seed: int = 0, hidden_size: int = 64,
                     num_layers: int = 2, vocab_size: int = 640, vision_hidden: int = 64,
                     vision_depth: int = 2, vision_intermediate: int | None = None) -> Path:
    """Write a deterministic random Qwen2.5-VL folder that stock `mlx_vlm.load` loads.

    Same arguments give byte-identical weights. `vocab_size` is the BPE target; the config's
    vocabulary equals the tokenizer's length (a padded vocabulary lets a random model emit ids that
    decode to nothing). `vision_intermediate` is the vision MLP's width (default
    2 x vision_hidden).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import qwen2_5_vl
    from mlx_vlm.utils import update_module_configs

    if hidden_size % 16:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of 16 (head_dim 16)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = _train_tokenizer(vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = tiny_config(len(tok), ids, hidden_size=hidden_size, num_layers=num_layers,
                         vision_hidden=vision_hidden, vision_depth=vision_depth,
                         vision_intermediate=vision_intermediate or 2 * vision_hidden)

    mx.random.seed(seed)
    cfg = json.loads(json.dumps(config))
    model_config = update_module_configs(
        qwen2_5_vl.ModelConfig.from_dict(cfg), qwen2_5_vl, cfg, ["text", "vision"])
    model = qwen2_5_vl.Model(model_config)
    mx.eval(model.parameters())
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})

    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(str(out))
    (out / "chat_template.json").write_text(
        json.dumps({"chat_template": QWEN25VL_CHAT_TEMPLATE}, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    video = {**PREPROCESSOR_CONFIG, "video_processor_type": "Qwen2VLVideoProcessor"}
    video.pop("image_processor_type")
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (out / "processor_config.json").write_text(
        json.dumps({"processor_class": "Qwen2_5_VLProcessor"}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"], "do_sample": False}, indent=2))
    return out

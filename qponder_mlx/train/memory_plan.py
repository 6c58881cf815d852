"""Predict a training run's peak memory from the model's config.json and the run's settings.

No weights are loaded: the parameter count of every tensor follows from the config (mlx-vlm's
Qwen2-VL / Qwen2.5-VL model classes), its bytes from the stored dtype or the `quantization` block.
`qponder train … --dry-run` prints the breakdown and which Apple memory sizes it fits.

What a step holds at its peak (all of it counted by `mx.get_peak_memory()`):

* weights as stored (a float base quantized in memory by `quantize_base` counts as quantized:
  mlx's affine format keeps `bits` per weight plus one scale and one bias per group, both in the
  weights' float dtype);
* LoRA parameters, their gradients and AdamW's two moments, all float32 (mlx-vlm draws the LoRA
  matrices with `mx.random.uniform`, float32);
* the frozen vision tower's cached outputs (`vision_cache` images, train/image_features.py);
* activations kept for the backward pass. Per token and decoder layer a LoRA step keeps about
  `ACT_HIDDEN` hidden-wide vectors (norm inputs/outputs, q/k/v/o inputs and outputs, residuals)
  and `ACT_INTER` MLP-wide ones (gate, up, their SiLU product); the attention's float32
  (heads, L, L) maps are not kept per layer but `ACT_SCORES` of them are alive while one layer
  runs its backward (the attention VJP recomputes them). Gradient checkpointing keeps one hidden
  vector per token and layer plus one layer's full set;
* the loss head: float32 logits over the vocabulary at every supervised token, with the
  log-softmax and the logits' gradient beside them (`ACT_LOGITS` vocabulary-wide vectors);
* GRPO: the rollout's KV cache, (prompt + max_completion_length) tokens for every decoding row
  (B·G rows, at most `max_rows` at a time), and the loss run `loss_rows` completions at a time
  against the prompt's cached keys/values.

The activation constants were fitted on float32 runs of the tiny model with 379-token rows
(activations dominate there; bench-free probe in `tests/test_memory_plan.py`, within ~25 %), and
the whole plan is checked on the real-layout fixtures at three SFT and three GRPO settings
against `mx.get_peak_memory()` (±20 %; there weights and the 151,936-wide loss head dominate). At
real widths the numbers are predictions, not measurements.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

GB = 1e9
GIB = 1024**3

# Vectors kept per token and layer for the backward pass (see the module doc).
ACT_HIDDEN = 12
ACT_INTER = 4
ACT_SCORES = 5  # float32 (heads, L, L) maps alive in one layer's backward (not kept per layer)
ACT_LOGITS = 3.5  # float32 vocabulary-wide vectors per supervised token (+ the bf16 head output)
PATCH_TOKENS = 4  # vision patches per image token (spatial merge 2 x 2)

# Apple silicon: the GPU working set macOS recommends (`recommendedMaxWorkingSetSize`, the
# ceiling mlx-lm wires with `mx.set_wired_limit` and MLX's allocator limit is derived from, at
# 1.5x). Measured: 16 GB -> 10.67 GB (exo-explore/exo PR 1672), 48 GB -> 37.44 GiB
# (yanun0323/Whallm PR 1), 128 GB -> 107.52 GiB (antirez/ds4 PR 893); the other sizes use
# macOS's 2/3 (<= 32 GB) and 3/4 (larger) rule those points follow.
MAC_SIZES_GB = (8, 16, 24, 32, 48, 64, 96, 128)
_MEASURED_WORKING_SET = {16: 10.67 * GB, 48: 37.44 * GIB, 128: 107.52 * GIB}


def working_set_bytes(ram_gb: int) -> float:
    if ram_gb in _MEASURED_WORKING_SET:
        return _MEASURED_WORKING_SET[ram_gb]
    return ram_gb * GB * (2 / 3 if ram_gb <= 32 else 3 / 4)


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The sizes a memory plan needs, from a Qwen2-VL / Qwen2.5-VL config.json."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    float_bytes: int  # the stored float dtype
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int
    vision_heads: int
    vision_gated: bool  # Qwen2.5-VL: SwiGLU MLP; Qwen2-VL: fc1/fc2
    bits: int | None = None  # quantized as stored (config `quantization`)
    group_size: int = 64

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, cfg: dict) -> ModelShape:
        text = {**cfg, **cfg.get("text_config", {})}
        v = cfg.get("vision_config", {})
        if cfg.get("model_type") == "qwen2_vl":
            vh = v.get("embed_dim", 1280)
            vi, gated = int(vh * v.get("mlp_ratio", 4)), False
        else:
            vh, vi, gated = v.get("hidden_size", 1280), v.get("intermediate_size", 3420), True
        q = cfg.get("quantization") or cfg.get("quantization_config") or {}
        dtype = str(text.get("torch_dtype") or text.get("dtype") or "bfloat16")
        return cls(
            model_type=cfg.get("model_type", "qwen2_5_vl"), hidden=text["hidden_size"],
            intermediate=text["intermediate_size"], layers=text["num_hidden_layers"],
            heads=text["num_attention_heads"],
            kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            vocab=text["vocab_size"], tied=bool(text.get("tie_word_embeddings", False)),
            float_bytes=_DTYPE_BYTES.get(dtype, 2), vision_hidden=vh, vision_intermediate=vi,
            vision_depth=v.get("depth", 32), vision_heads=v.get("num_heads", 16),
            vision_gated=gated, bits=q.get("bits"), group_size=q.get("group_size", 64))

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ModelShape:
        return cls.from_config(json.loads((Path(path) / "config.json").read_text()))


# ---------------------------------------------------------------- parameters


def language_linears(s: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of one decoder layer."""
    kv = s.kv_heads * s.head_dim
    return {"q_proj": (s.hidden, s.hidden), "k_proj": (s.hidden, kv),
            "v_proj": (s.hidden, kv), "o_proj": (s.hidden, s.hidden),
            "gate_proj": (s.hidden, s.intermediate), "up_proj": (s.hidden, s.intermediate),
            "down_proj": (s.intermediate, s.hidden)}


def _quantized_bytes(n: int, in_dim: int, bits: int, group: int, scale_bytes: int,
                     float_bytes: int) -> float:
    if in_dim % group:  # mlx leaves layers without whole groups in float
        return n * float_bytes
    return n * bits / 8 + 2 * (n / group) * scale_bytes


def weight_bytes(s: ModelShape, quantize_bits: int | None = None, group_size: int = 64) -> dict:
    """Bytes of the language model and the vision tower as held in memory.

    Quantized (as stored, or `quantize_bits` in memory): the language model's linears and
    embedding (and an untied head) — mlx_vlm.convert and train/lora.quantize_language_model
    both leave the vision tower in float."""
    bits = s.bits or quantize_bits
    group = s.group_size if s.bits else group_size
    fb = s.float_bytes

    def weights(n: int, in_dim: int) -> float:
        return n * fb if bits is None else _quantized_bytes(n, in_dim, bits, group, fb, fb)

    layer = 0.0
    for name, (i, o) in language_linears(s).items():
        layer += weights(i * o, i)
        if name in ("q_proj", "k_proj", "v_proj"):
            layer += o * fb  # Qwen2's q/k/v biases
    layer += 2 * s.hidden * fb  # two RMSNorms
    embed = weights(s.vocab * s.hidden, s.hidden)
    head = 0.0 if s.tied else weights(s.vocab * s.hidden, s.hidden)
    language = s.layers * layer + embed + head + s.hidden * fb

    vh, vi = s.vision_hidden, s.vision_intermediate
    mlp = (3 if s.vision_gated else 2) * vh * vi + (2 * vi + vh if s.vision_gated else vi + vh)
    block = 3 * vh * vh + 3 * vh + vh * vh + vh + mlp + 2 * vh
    merged = vh * PATCH_TOKENS
    merger = vh + merged * merged + merged + merged * s.hidden + s.hidden
    vision = (3 * 2 * 14 * 14 * vh + s.vision_depth * block + merger) * fb
    return {"language": language, "vision": vision}


def lora_params(s: ModelShape, rank: int, targets: list[str]) -> int:
    dims = language_linears(s)
    return s.layers * sum(rank * (dims[t][0] + dims[t][1]) for t in targets if t in dims)


# ---------------------------------------------------------------- activations


def _act_dtype(s: ModelShape) -> int:
    return s.float_bytes  # quantized layers compute in their scales' float dtype


def layer_activations(s: ModelShape, rows: int, tokens: int) -> float:
    """Bytes one decoder layer keeps for the backward pass for `rows` x `tokens` tokens."""
    per_token = (ACT_HIDDEN * s.hidden + ACT_INTER * s.intermediate
                 + 4 * s.kv_heads * s.head_dim) * _act_dtype(s)
    return rows * tokens * per_token


def attention_maps(s: ModelShape, rows: int, tokens: int, context: int) -> float:
    """The float32 (heads, tokens, context) maps alive while one layer runs its backward."""
    return ACT_SCORES * rows * s.heads * tokens * context * 4


def backward_activations(s: ModelShape, rows: int, tokens: int, context: int,
                         checkpoint: bool) -> float:
    """Kept for the backward pass (every layer's set, or with checkpointing every layer's input
    and one layer's set), plus one layer's attention maps."""
    one = layer_activations(s, rows, tokens)
    kept = (s.layers * one if not checkpoint
            else s.layers * rows * tokens * s.hidden * _act_dtype(s) + one)
    return kept + attention_maps(s, rows, tokens, context)


def loss_head(s: ModelShape, positions: int) -> float:
    return positions * s.vocab * (ACT_LOGITS * 4 + _act_dtype(s))


def kv_cache(s: ModelShape, rows: int, tokens: int) -> float:
    return s.layers * 2 * rows * tokens * s.kv_heads * s.head_dim * _act_dtype(s)


def vision_forward(s: ModelShape, image_tokens: int) -> float:
    """Transient peak of one image through the frozen tower (no graph kept): a block's
    activations and, in its full-attention blocks, float32 (heads, N, N) scores."""
    n = image_tokens * PATCH_TOKENS
    block = n * (6 * s.vision_hidden + 3 * s.vision_intermediate) * s.float_bytes
    return block + 2 * s.vision_heads * n * n * 4


# ---------------------------------------------------------------- the plan


@dataclass
class RunShape:
    """The settings of a run that move memory (SFT and GRPO share the fields they share)."""

    stage: str  # sft | grpo
    batch_size: int
    image_tokens: int  # per image at --max-pixels
    prompt_tokens: int  # text tokens before the answer (chat template, image placeholder out)
    answer_tokens: int  # sft: the longest answer; grpo: max_completion_length
    lora_rank: int
    lora_targets: list[str]
    quantize_base: int | None = None
    quantize_group_size: int = 64
    vision_cache_images: int = 0  # images whose tower output stays cached (sft)
    group_size: int = 1  # grpo G
    max_rows: int = 16  # grpo: decoding rows at a time
    loss_rows: int = 2  # grpo: completions differentiated at a time


@dataclass
class MemoryPlan:
    parts: dict[str, float]  # resident parts (bytes)
    step: dict[str, float]  # the step's transient parts, without gradient checkpointing
    step_checkpointed: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def peak(self, checkpoint: bool = False) -> float:
        step = self.step_checkpointed if checkpoint else self.step
        return sum(self.parts.values()) + max(step.values())

    def fits(self, checkpoint: bool = False) -> list[int]:
        return [gb for gb in MAC_SIZES_GB if self.peak(checkpoint) <= working_set_bytes(gb)]


def plan(s: ModelShape, run: RunShape) -> MemoryPlan:
    w = weight_bytes(s, run.quantize_base, run.quantize_group_size)
    n_lora = lora_params(s, run.lora_rank, run.lora_targets)
    parts = {
        "weights (language)": w["language"],
        "weights (vision)": w["vision"],
        "LoRA params + grads (f32)": 2 * 4 * n_lora,
        "AdamW state (f32)": 2 * 4 * n_lora,
    }
    b = _act_dtype(s)
    seq = run.prompt_tokens + run.image_tokens + run.answer_tokens
    vision = vision_forward(s, run.image_tokens)
    if run.stage == "sft":
        parts["vision feature cache"] = (run.vision_cache_images * run.image_tokens * s.hidden
                                         * b)
        sup = run.batch_size * (run.answer_tokens + 1)
        step, step_ck = {}, {}
        for ck, out in ((False, step), (True, step_ck)):
            out["activations + loss head"] = (
                backward_activations(s, run.batch_size, seq, seq, ck) + loss_head(s, sup))
            out["vision tower (transient)"] = vision
        notes = [f"{run.batch_size} row(s) x {seq} tokens ({run.prompt_tokens} prompt + "
                 f"{run.image_tokens} image + {run.answer_tokens} answer)"]
        return MemoryPlan(parts, step, step_ck, notes)

    g, prompt = run.group_size, run.prompt_tokens + run.image_tokens
    rows = min(run.batch_size * g, max(g, run.max_rows // g * g))
    parts["prompt KV states (B images)"] = kv_cache(s, run.batch_size, prompt)
    rollout = kv_cache(s, rows, prompt + run.answer_tokens) + rows * s.vocab * 4
    step, step_ck = {}, {}
    chunk = min(run.loss_rows, g)
    for ck, out in ((False, step), (True, step_ck)):
        out["rollout KV cache"] = rollout
        out["loss (completions)"] = (
            backward_activations(s, chunk, run.answer_tokens, prompt + run.answer_tokens, ck)
            + loss_head(s, chunk * run.answer_tokens))
        out["loss (prompt VJP)"] = backward_activations(s, 1, prompt, prompt, ck)
        out["vision tower (transient)"] = vision
    notes = [f"{run.batch_size} image(s) x G={g}: {rows} decoding rows x "
             f"({prompt} prompt + {run.answer_tokens} completion) tokens; loss {chunk} rows "
             "at a time"]
    return MemoryPlan(parts, step, step_ck, notes)


# ---------------------------------------------------------------- report


def _gb(x: float) -> str:
    return f"{x / GB:.2f} GB" if x >= 0.1 * GB else f"{x / 1e6:.1f} MB"


def render(p: MemoryPlan, title: str) -> str:
    lines = [title, *[f"  {n}" for n in p.notes], "  resident:"]
    lines += [f"    {k:<34} {_gb(v):>10}" for k, v in p.parts.items()]
    lines.append(f"  step peak part{'':<23}{'no checkpointing':>18}{'checkpointing':>16}")
    for k in p.step:
        lines.append(f"    {k:<34} {_gb(p.step[k]):>14} {_gb(p.step_checkpointed[k]):>15}")
    a, c = p.peak(False), p.peak(True)
    lines.append(f"  predicted peak{'':<23}{_gb(a):>14} {_gb(c):>15}")
    fa = ", ".join(f"{g} GB" for g in p.fits(False)) or "none of 8-128 GB"
    fc = ", ".join(f"{g} GB" for g in p.fits(True)) or "none of 8-128 GB"
    lines.append(f"  fits (under the recommended GPU working set): {fa}")
    lines.append(f"  with --grad-checkpoint: {fc}")
    return "\n".join(lines)


# ---------------------------------------------------------------- from a run's config


def image_tokens_at(max_pixels: int, patch: int = 14, merge: int = 2) -> int:
    """Most LLM image tokens an image can have under `max_pixels` (one per merged 28 x 28)."""
    return max(1, max_pixels // (patch * merge) ** 2)


def _prompt_tokens(tokenizer, messages: list[dict]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 1  # the placeholder


def run_shape(cfg, stage: str, tokenizer, *, model_type: str = "qwen2_5_vl",
              max_rows_read: int = 5000) -> RunShape:
    """The RunShape of an SFTConfig / GRPOConfig. SFT reads its data file's rows (text only:
    the longest prompt and answer of the first `max_rows_read`); GRPO uses the scoring prompt."""
    from qponder_mlx.prompts import chat_messages

    image_tokens = image_tokens_at(cfg.max_pixels)
    common = dict(batch_size=cfg.batch_size, image_tokens=image_tokens,
                  lora_rank=cfg.lora.rank, lora_targets=list(cfg.lora.target_modules),
                  quantize_base=cfg.quantize_base,
                  quantize_group_size=cfg.quantize_group_size)
    if stage == "grpo":
        return RunShape(stage="grpo", prompt_tokens=_prompt_tokens(tokenizer, chat_messages()),
                        answer_tokens=cfg.max_completion_length, group_size=cfg.group_size,
                        max_rows=cfg.max_rows, loss_rows=cfg.loss_rows, **common)
    from qponder_mlx.train.sft_rows import place_image

    prompt, answer, images = _prompt_tokens(tokenizer, chat_messages()), 256, set()
    path = Path(cfg.data) if cfg.data else None
    if path is not None and path.is_file():
        longest_p = longest_a = 0
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= max_rows_read:
                    break
                try:
                    row = json.loads(line)
                    msgs = row.get("messages", row.get("conversations"))
                    content = msgs[-1]["content"]
                    text = content if isinstance(content, str) else "".join(
                        c.get("text", "") for c in content if isinstance(c, dict))
                    longest_a = max(longest_a, len(tokenizer(text)["input_ids"]) + 1)
                    longest_p = max(longest_p, _prompt_tokens(
                        tokenizer, place_image(msgs[:-1], model_type)))
                    imgs = row.get("images", row.get("image"))
                    images.update([imgs] if isinstance(imgs, str) else imgs or [])
                except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                    continue  # the run skips such rows too
        if longest_p:
            prompt, answer = longest_p, longest_a
    cache = min(len(images), cfg.vision_cache) if images else cfg.vision_cache
    frozen = not cfg.lora.train_vision
    return RunShape(stage="sft", prompt_tokens=prompt, answer_tokens=answer,
                    vision_cache_images=cache if frozen else 0, **common)


class PlanError(ValueError):
    """The model's config or tokenizer cannot be read; one line."""


def model_files_dir(model: str) -> Path:
    """A folder with the model's config and tokenizer files, weights not downloaded: the folder
    itself, or the hub repo's *.json / *.txt / *.jinja files."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"{path}: no config.json — point --model at a model folder")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.txt", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 — any hub failure is the same one-line message
        raise PlanError(f"--model {model}: cannot fetch its config.json ({type(e).__name__})"
                        " — pass a local folder or check the repo id") from None


def plan_for_config(cfg, stage: str) -> tuple[MemoryPlan, str]:
    """The memory plan of an SFTConfig / GRPOConfig and a title naming model and stage."""
    from transformers import AutoTokenizer

    folder = model_files_dir(cfg.model)
    try:
        shape = ModelShape.from_model_dir(folder)
    except (KeyError, ValueError) as e:
        raise PlanError(f"{folder / 'config.json'}: not a Qwen2-VL/Qwen2.5-VL config "
                        f"({e}) — the planner reads those") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise PlanError(f"{folder}: cannot read the tokenizer ({e}) — the planner counts "
                        "prompt tokens with it") from None
    p = plan(shape, run_shape(cfg, stage, tok, model_type=shape.model_type))
    if stage == "grpo":
        p.notes.append("(gradient checkpointing is an SFT option; its GRPO column is what it "
                       "would save)")
    stored = f"{shape.bits}-bit" if shape.bits else (
        f"{cfg.quantize_base}-bit in memory" if cfg.quantize_base else
        {2: "bf16/fp16", 4: "float32"}[shape.float_bytes])
    title = (f"memory plan: {stage} on {cfg.model} ({shape.model_type}, {stored}, "
             f"{shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab:,}) "
             "— predicted, not measured")
    return p, title

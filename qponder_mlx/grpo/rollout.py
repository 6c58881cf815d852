"""Group rollouts: one vision encode and one prefill per image, G samples decoded as a batch.

mlx-vlm 0.7.10's GRPO trainer prefills and decodes every completion separately, so an image's
vision tower and prompt run G times and the G decodes run one after another. Here an image's
prompt is prefilled once, its KV cache is copied into G rows (`generate.repeat_cache`) and all
rows of all images of one size decode together; `max_rows` bounds the batch for memory.

The policy's log-probs for the loss use the same sharing with gradients: the prompt (and image)
goes through the model once per image, its keys/values are repeated for the G completions, and
only the completion tokens run G times (`completion_logps`).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_vlm.models.cache import ConcatenateKVCache
from PIL import Image

from qponder_mlx import generate as gen
from qponder_mlx.train.image_features import features_are_fixed, tower_output

# One prompt's state after the prefill (see `prompt_state`): the last position's logits
# (1, 1, V), every layer's keys and values (1, heads, L, dim), where the completion's positions
# start (1, 1).
PromptState = tuple[mx.array, list[mx.array], list[mx.array], mx.array]


@dataclass
class Rollout:
    inputs: list[gen.Inputs]  # per image: input_ids (1, L), pixel_values, image_grid_thw
    completions: list[list[gen.Completion]]  # per image: G completions
    texts: list[str]  # B·G decoded texts, groups contiguous
    # Per image, the prefill's state under the weights that sampled: the update's policy pass
    # starts from it instead of running each prompt again (valid until the weights change).
    prompt_states: list[PromptState] | None = None

    @property
    def group_size(self) -> int:
        return len(self.completions[0])


def rollout(model, processor, prompt: str, images: list[Image.Image], group_size: int,
            sampling: gen.SamplingConfig, *, max_rows: int = 64,
            watch_ids: list[int] | None = None) -> Rollout:
    """G sampled completions for each image (same prompt), grouped per image in input order.

    `watch_ids`: tokens whose log-probs every completion keeps per step (`gen.decode`)."""
    stops = gen.stop_tokens(model, processor.tokenizer)
    per_image = [gen.encode(processor, [prompt], [im]) for im in images]
    # A frozen tower's features serve the rollout and every later pass over this step's images
    # (reference and policy log-probs): once per image instead of three times.
    if features_are_fixed(model):
        for x in per_image:
            x["image_features"] = tower_output(model, x["pixel_values"], x["image_grid_thw"])
    completions: list[list[gen.Completion] | None] = [None] * len(images)
    states: list[PromptState | None] = [None] * len(images)
    lengths = [x["input_ids"].shape[1] for x in per_image]
    per_batch = max(1, max_rows // group_size)
    # Fresh each rollout: the weights changed since the last step.
    prefix = gen.PrefixCache(model.config.image_token_id)
    for batch in gen.bucket_by_length(lengths, per_batch):
        inputs = _stack([per_image[i] for i in batch])
        pre = gen.prefill(model, inputs, prefix)
        for k, i in enumerate(batch):
            states[i] = _row_state(pre, k)
        pre = gen.repeat_cache(pre, group_size)
        comps = gen.detokenize(processor.tokenizer, gen.decode(model, pre, sampling, stops,
                                                                 watch_ids=watch_ids),
                               stops)
        for k, i in enumerate(batch):
            completions[i] = comps[k * group_size:(k + 1) * group_size]
    texts = [c.text for group in completions for c in group]
    return Rollout(per_image, completions, texts, states)


def _row_state(pre: gen.Prefill, k: int) -> PromptState:
    """Row k of a batched prefill as one prompt's state."""
    states = [c.state for c in pre.cache]
    keys = [kv[0][k:k + 1] for kv in states]
    values = [kv[1][k:k + 1] for kv in states]
    return pre.logits[k:k + 1, None, :], keys, values, pre.prompt_len + pre.rope_deltas[k:k + 1]


def _stack(rows: list[gen.Inputs]) -> gen.Inputs:
    """Batch single-image inputs of equal length (pixel rows concatenate, as the processor does)."""
    if len(rows) == 1:
        return rows[0]
    out = {"input_ids": mx.concatenate([r["input_ids"] for r in rows], axis=0)}
    for k in ("pixel_values", "image_grid_thw", "image_features"):
        if k in rows[0]:
            out[k] = mx.concatenate([r[k] for r in rows], axis=0)
    return out


def pad_completions(group: list[gen.Completion], pad_id: int,
                    width: int | None = None) -> tuple[mx.array, mx.array]:
    """(G, T) token ids right-padded with pad_id, and the (G, T) mask of real tokens."""
    width = width or max(1, max(len(c.token_ids) for c in group))
    ids = [c.token_ids + [pad_id] * (width - len(c.token_ids)) for c in group]
    mask = [[1] * len(c.token_ids) + [0] * (width - len(c.token_ids)) for c in group]
    return mx.array(ids, dtype=mx.int32), mx.array(mask, dtype=mx.int32)


def prompt_state(model, inputs: gen.Inputs) -> PromptState:
    """One prompt (batch 1) through the model: the logits of its last position (1, 1, V), every
    layer's keys and values, and where the completion's positions start (1, 1)."""
    lm = model.language_model
    feats = model.get_input_embeddings(inputs["input_ids"], inputs.get("pixel_values"),
                                       image_grid_thw=inputs.get("image_grid_thw"),
                                       cached_image_features=inputs.get("image_features"))
    cache = [ConcatenateKVCache() for _ in lm.layers]
    h = lm.model(inputs["input_ids"], inputs_embeds=feats.inputs_embeds, cache=cache,
                 position_ids=feats.position_ids)
    first = gen.lm_head(lm, h[:, -1:, :])
    start = inputs["input_ids"].shape[1] + feats.rope_deltas.astype(mx.int32)
    return first, [c.keys for c in cache], [c.values for c in cache], start


def text_positions(start, rows: int, length: int) -> mx.array:
    """(3, rows, length) M-RoPE position ids of text tokens from `start` (an int or a (1, 1)
    array): the three sections share one position after the image."""
    pos = mx.reshape(start + mx.arange(length), (1, 1, length))
    return mx.broadcast_to(pos, (3, rows, length))


def logps_after_prompt(model, first: mx.array, keys: list[mx.array], values: list[mx.array],
                       start: mx.array, completion_ids: mx.array, *,
                       temperature: float = 1.0) -> mx.array:
    """(G, T) log-probs of completions that follow one prompt's state (see `prompt_state`)."""
    lm = model.language_model
    g, t = completion_ids.shape
    logits = mx.repeat(first, g, axis=0)  # (G, 1, V): scores token 0
    if t > 1:
        h = lm.model(completion_ids[:, :-1], cache=gen.repeated_cache(keys, values, g),
                     position_ids=text_positions(start, g, t - 1))
        logits = mx.concatenate([logits, gen.lm_head(lm, h)], axis=1)
    logits = logits.astype(mx.float32) / temperature
    lse = mx.logsumexp(logits, axis=-1)
    picked = mx.take_along_axis(logits, completion_ids[..., None], axis=-1)[..., 0]
    return picked - lse


def completion_logps(model, inputs: gen.Inputs, completion_ids: mx.array, *,
                     temperature: float = 1.0) -> mx.array:
    """log p(completion token) under the model, (G, T), differentiable w.r.t. the model.

    The prompt runs once (batch 1); its keys/values are repeated for the G rows; token t is
    scored by the hidden state before it (the prompt's last position for t = 0). Logits are
    divided by `temperature` as in TRL, so ratios compare the sampling distribution.
    """
    first, keys, values, start = prompt_state(model, inputs)
    return logps_after_prompt(model, first, keys, values, start, completion_ids,
                              temperature=temperature)

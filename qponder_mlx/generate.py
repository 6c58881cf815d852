"""Batched prefill + decode for Qwen2.5-VL on mlx-vlm's model classes.

mlx-vlm's `generate` handles one prompt at a time and its `batch_generate` fails on several images
(see docs/benchmarks.md). Scoring a library, evaluating, distilling locally and GRPO rollouts all
need the same thing: many rows decoded together. This module does it with the model's own layers,
mlx-vlm's KV cache and mlx-lm's samplers:

* rows with the same input length (same prompt, same image grid) are prefilled as one batch, so
  no padding and no per-row masks are needed (callers bucket by length, see `bucket_by_length`);
* `repeat_cache` copies one prefilled prompt into n rows, so a group of G samples for an image
  costs one vision encode and one prefill (GRPO);
* rows that finish are dropped from the batch as the tail shrinks, so a few long answers don't
  keep paying for the whole batch.

Positions follow Qwen2.5-VL's mRoPE: the prefill gets the 3-D positions from `get_rope_index`,
each decode step uses `offset + rope_delta`, exactly as the model computes them itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_sampler
from mlx_vlm.models.cache import ConcatenateKVCache, KVCache
from PIL import Image

Inputs = dict[str, mx.array]


@dataclass
class SamplingConfig:
    max_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0


@dataclass
class Completion:
    token_ids: list[int]  # generated ids, the stop token included when one was emitted
    logprobs: list[float]  # log p(token) under the (untempered) model, one per id
    finish_reason: str  # "stop" | "length"
    text: str = ""
    # log p of each watched token id at every generated position (decode(watch_ids=...)), from
    # the same untempered distribution as `logprobs`; None when nothing was watched.
    watch: list[list[float]] | None = None


@dataclass
class Prefill:
    cache: list[KVCache]
    logits: mx.array  # (B, V) next-token logits after the prompt
    rope_deltas: mx.array  # (B, 1) mRoPE offset of each row
    prompt_len: int


@dataclass
class StopTokens:
    stop: set[int] = field(default_factory=set)
    banned: list[int] = field(default_factory=list)  # never sampled (image/video pads)


def stop_tokens(model, tokenizer) -> StopTokens:
    """EOS ids from the model config and tokenizer; vision placeholders banned from sampling."""
    cfg = model.config
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos])
    stop.add(tokenizer.eos_token_id)
    # Qwen's generation_config stops on both <|im_end|> and <|endoftext|>.
    for name in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid >= 0:
            stop.add(tid)
    banned = [cfg.image_token_id, cfg.video_token_id]
    vision_pad = getattr(cfg, "vision_token_id", None)
    if vision_pad is not None:
        banned.append(vision_pad)
    return StopTokens(stop={int(t) for t in stop if t is not None}, banned=banned)


def encode(processor, prompts: Sequence[str], images: Sequence[Image.Image]) -> Inputs:
    """Tokenize prompts (each with one image placeholder) and preprocess their images."""
    out = processor(text=list(prompts), images=list(images), padding=False)
    keep = ("input_ids", "pixel_values", "image_grid_thw")
    return {k: mx.array(out[k]) for k in keep if k in out}


def lm_head(lm, h: mx.array) -> mx.array:
    """The output projection (tied or not) applied to hidden states."""
    if lm.args.tie_word_embeddings:
        return lm.model.embed_tokens.as_linear(h)
    return lm.lm_head(h)


def shared_prefix(rows: Sequence[Sequence[int]], image_token_id: int) -> int:
    """How many leading tokens all rows share before any of them reaches an image token. Up
    to there every row has the same embeddings, positions and (causal) attention, so the same
    hidden states; an image token's embedding is its image's, so sharing stops before it. The
    one rule for every prefix shared across rows (scoring, GRPO rollout, SFT batches)."""
    n = min(len(r) for r in rows)
    first = np.stack([np.asarray(r[:n]) for r in rows])
    same = (first == first[0]).all(axis=0) & (first[0] != image_token_id)
    return n if same.all() else int(np.argmin(same))


class PrefixCache:
    """The keys/values of the text before the image, shared by every row of one prompt.

    With the instruction written before the image (prompts.chat_messages), everything up to and
    including `<|vision_start|>` is the same for every photo, so it runs through the language
    model once instead of once per photo. Positions there are plain text positions, identical in
    all three mRoPE dimensions, so the cached keys are exactly what a full prefill computes.
    Valid for fixed weights only: scoring keeps one; training code must not (the prefix's keys
    depend on the LoRA weights being trained).
    """

    def __init__(self, image_token_id: int):
        self.image_token_id = image_token_id
        self._ids: tuple[int, ...] | None = None
        self._state: list[tuple[mx.array, mx.array]] = []

    def length(self, input_ids: mx.array) -> int:
        """Shared prefix length of a batch (`shared_prefix`), leaving the last token to run."""
        rows = input_ids.tolist()
        return min(shared_prefix(rows, self.image_token_id), len(rows[0]) - 1)

    def states(self, model, ids: list[int]) -> list[tuple[mx.array, mx.array]]:
        if self._ids != tuple(ids):
            lm = model.language_model
            cache = [KVCache() for _ in lm.layers]
            n = len(ids)
            pos = mx.broadcast_to(mx.arange(n)[None, None, :], (3, 1, n))
            lm.model(mx.array([ids]), cache=cache, position_ids=pos)
            self._state = [c.state for c in cache]
            mx.eval(self._state)
            self._ids = tuple(ids)
        return self._state


def repeated_cache(keys: list[mx.array], values: list[mx.array],
                   n: int) -> list[ConcatenateKVCache]:
    """A cache holding one prefix's keys/values n times (one row per continuation). Built by
    concatenation, so gradients flow back through it into the prefix (training code)."""
    cache = []
    for k, v in zip(keys, values):
        c = ConcatenateKVCache()
        c.state = (mx.repeat(k, n, axis=0), mx.repeat(v, n, axis=0))
        cache.append(c)
    return cache


def _prompt_hidden(model, inputs: Inputs, cache: list[KVCache],
                   prefix: PrefixCache | None = None):
    ids = inputs["input_ids"]
    feats = model.get_input_embeddings(ids, inputs.get("pixel_values"),
                                       image_grid_thw=inputs.get("image_grid_thw"),
                                       cached_image_features=inputs.get("image_features"))
    start = prefix.length(ids) if prefix is not None else 0
    if start:
        b = ids.shape[0]
        for c, (k, v) in zip(cache, prefix.states(model, ids[0, :start].tolist())):
            c.state = (mx.repeat(k, b, axis=0), mx.repeat(v, b, axis=0))
    h = model.language_model.model(ids[:, start:], inputs_embeds=feats.inputs_embeds[:, start:],
                                   cache=cache, position_ids=feats.position_ids[:, :, start:])
    return h, feats.rope_deltas


def prefill(model, inputs: Inputs, prefix: PrefixCache | None = None) -> Prefill:
    """Encode images, run the prompt through the language model, keep the KV cache."""
    lm = model.language_model
    cache = [KVCache() for _ in lm.layers]
    h, deltas = _prompt_hidden(model, inputs, cache, prefix)
    # Project only the last position: the full (L, vocab) logits of a 150k vocabulary would
    # cost more than a layer of the model and are never read.
    logits = lm_head(lm, h[:, -1, :])
    mx.eval(logits, [c.state for c in cache])
    return Prefill(cache, logits, deltas.astype(mx.int32), inputs["input_ids"].shape[1])


def prefill_logits(model, inputs: Inputs, prefix: PrefixCache | None = None) -> mx.array:
    """Next-token logits after each prompt (fast scoring); the cache is dropped afterwards."""
    return prefill(model, inputs, prefix).logits


def repeat_cache(pre: Prefill, n: int) -> Prefill:
    """n copies of every row (row-major: r0,r0,..,r1,r1,..): one prefill feeds a whole group."""
    if n == 1:
        return pre
    cache = []
    for c in pre.cache:
        k, v = c.state
        rc = KVCache()
        rc.state = (mx.repeat(k, n, axis=0), mx.repeat(v, n, axis=0))
        cache.append(rc)
    return Prefill(cache, mx.repeat(pre.logits, n, axis=0), mx.repeat(pre.rope_deltas, n, axis=0),
                   pre.prompt_len)


def _with_room(k: mx.array, v: mx.array, room: int) -> KVCache:
    """A cache holding keys/values (B, heads, L, dim) with space for `room` more positions.

    mlx-vlm's KVCache grows in blocks of 256 positions, and a cache set from a prefill's state is
    full, so the first decode step copies it into L + 256 slots. Sizing it once for the tokens
    still to come avoids that copy and the unused slots (G rows x 256 positions x every layer).
    mlx-vlm's own `KVCache.prefix_cache_reserve` pads the same way but rounds the capacity up to
    that 256-slot step, which keeps up to 255 unused slots per row and layer.
    """
    c = KVCache()
    if room > 0:
        k = mx.concatenate([k, mx.zeros((*k.shape[:2], room, k.shape[3]), k.dtype)], axis=2)
        v = mx.concatenate([v, mx.zeros((*v.shape[:2], room, v.shape[3]), v.dtype)], axis=2)
    c.keys, c.values, c.offset = k, v, k.shape[2] - max(room, 0)
    return c


def _select_rows(pre_cache: list[KVCache], rows: mx.array | None, room: int) -> list[KVCache]:
    """Some rows of a cache (all with `rows=None`), with space for `room` more positions."""
    out = []
    for c in pre_cache:
        k, v = c.state
        if rows is not None:
            k, v = k[rows], v[rows]
        out.append(_with_room(k, v, room))
    return out


def _step(lm, tokens: mx.array, cache: list[KVCache], rope_deltas: mx.array) -> mx.array:
    offset = cache[0].offset
    pos = (rope_deltas + offset).reshape(1, -1, 1)
    pos = mx.broadcast_to(pos, (3, tokens.shape[0], 1))
    return lm(tokens[:, None], cache=cache, position_ids=pos).logits[:, -1, :]


def decode(model, pre: Prefill, cfg: SamplingConfig, stops: StopTokens,
           sampler: Callable[[mx.array], mx.array] | None = None,
           watch_ids: Sequence[int] | None = None) -> list[Completion]:
    """Sample every row of a prefilled batch until it stops or reaches cfg.max_tokens.

    `watch_ids`: also keep, at every step, the log-probabilities of these tokens (e.g. the digits,
    for an expected-value read-out of the answer) — a (rows, len(watch_ids)) gather per step.
    """
    lm = model.language_model
    sampler = sampler or make_sampler(cfg.temperature, top_p=cfg.top_p if cfg.top_p < 1 else 0.0)
    n = pre.logits.shape[0]
    ids: list[list[int]] = [[] for _ in range(n)]
    lps: list[list[float]] = [[] for _ in range(n)]
    watched: list[list[list[float]]] = [[] for _ in range(n)]
    watch = mx.array(list(watch_ids)) if watch_ids else None
    done = [False] * n
    active = list(range(n))  # original row index of each live batch row
    # Every step but the last feeds its token back: at most max_tokens - 1 positions to add.
    cache = _select_rows(pre.cache, None, cfg.max_tokens - 1)
    logits, deltas = pre.logits, pre.rope_deltas
    ban = None
    if stops.banned:
        ban = mx.zeros((logits.shape[-1],), dtype=mx.bool_)
        ban[mx.array(stops.banned)] = True
    for step in range(cfg.max_tokens):
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        masked = mx.where(ban, -mx.inf, logprobs) if ban is not None else logprobs
        tok = sampler(masked)
        tok_lp = mx.take_along_axis(logprobs, tok[:, None], axis=-1)[:, 0]
        w = logprobs[:, watch] if watch is not None else None
        mx.eval(tok, tok_lp, *([w] if w is not None else []))
        toks, tlps = tok.tolist(), tok_lp.tolist()
        ws = w.tolist() if w is not None else None
        for j, row in enumerate(active):
            if done[row]:
                continue
            ids[row].append(toks[j])
            lps[row].append(tlps[j])
            if ws is not None:
                watched[row].append(ws[j])
            if toks[j] in stops.stop:
                done[row] = True
        live = [j for j, row in enumerate(active) if not done[row]]
        if not live or step == cfg.max_tokens - 1:
            break
        # Drop finished rows once a quarter of the batch is idle: the copy costs about one
        # decode step, and every later step then runs on fewer rows.
        if len(live) <= 0.75 * len(active):
            sel = mx.array(live)
            cache = _select_rows(cache, sel, cfg.max_tokens - 1 - step)
            deltas = deltas[sel]
            tok = tok[sel]
            active = [active[j] for j in live]
        logits = _step(lm, tok, cache, deltas)
    return [Completion(ids[i], lps[i], "stop" if done[i] else "length",
                       watch=watched[i] if watch is not None else None) for i in range(n)]


def detokenize(tokenizer, completions: list[Completion], stops: StopTokens) -> list[Completion]:
    for c in completions:
        body = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
        c.text = tokenizer.decode(body, skip_special_tokens=True)
    return completions


def generate_rows(model, processor, prompts: Sequence[str], images: Sequence[Image.Image],
                  cfg: SamplingConfig, *, n: int = 1, prefix: PrefixCache | None = None,
                  watch_ids: Sequence[int] | None = None) -> list[list[Completion]]:
    """n completions for each (prompt, image) row; all rows must encode to the same length.

    Returns one list of n completions per row, in input order.
    """
    inputs = encode(processor, prompts, images)
    pre = repeat_cache(prefill(model, inputs, prefix), n)
    stops = stop_tokens(model, processor.tokenizer)
    comps = detokenize(processor.tokenizer, decode(model, pre, cfg, stops, watch_ids=watch_ids),
                       stops)
    return [comps[i * n:(i + 1) * n] for i in range(len(prompts))]


def bucket_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped so each batch holds rows of one length, at most batch_size rows each.

    Order is stable: batches come in order of their first row, rows in input order.
    """
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        groups.setdefault(length, []).append(i)
    batches = [g[s:s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]
    return sorted(batches, key=lambda b: b[0])

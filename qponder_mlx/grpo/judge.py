"""Blind re-scoring: the score that a completion's reasoning alone implies.

A judge model reads only the reasoning (no image, the answer removed) after a short prompt, in
our own answer format: the assistant turn is prefilled with `<think>{reasoning}</think><answer>`,
so the next token is the score's leading digit. s_text = Σ p(d)·d over the digits 1–5 +
E[first decimal]/10, the decimal read after appending the most likely leading digit and the dot
(the expected read-out's formula). The whole group is ONE batched forward pass: rows are
right-padded, which causal attention makes harmless, and each row's logits are read at its own
last real position; the two appended tokens run on its cache with the padding masked out.
The rows' common head (chat template + judge prompt: ~100 of ~160 tokens per row for a ~40-token
reasoning, bench/judge_speed.py) runs once and its keys/values are repeated for every row, as the
rollout does with an image's prompt — the same attention, ~60 % less work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np
from mlx_vlm.models.cache import ConcatenateKVCache

from qponder_mlx.generate import lm_head, repeated_cache
from qponder_mlx.grpo.rollout import text_positions
from qponder_mlx.prompts import ANSWER_OPEN, THINK_CLOSE, THINK_OPEN
from qponder_mlx.readout import (
    digit_probs,
    digits_value,
    expected_score,
    score_token_ids,
    single_token_ids,
)

JUDGE_VERSION = "judge-v2"  # v2: reads the first decimal too
JUDGE_PROMPT = (
    "An expert wrote the assessment below about a photo's technical quality; the photo is not "
    "shown. From the assessment alone, rate the photo from 1 (bad) to 5 (excellent)."
)

Judge = Callable[[Sequence[str | None]], np.ndarray]


def judge_texts(tokenizer, reasonings: Sequence[str]) -> list[str]:
    head = tokenizer.apply_chat_template([{"role": "user", "content": JUDGE_PROMPT}],
                                         tokenize=False, add_generation_prompt=True)
    return [f"{head}{THINK_OPEN}{r}{THINK_CLOSE}{ANSWER_OPEN}" for r in reasonings]


def _right_pad(rows: list[list[int]], pad: int) -> tuple[mx.array, mx.array]:
    width = max(len(r) for r in rows)
    ids = mx.array([r + [pad] * (width - len(r)) for r in rows])
    return ids, mx.array([len(r) - 1 for r in rows])


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for k in range(max(n, 0)):
        if any(r[k] != first[k] for r in rows):
            return k
    return max(n, 0)


def _judge_pass(lm, rows: list[list[int]], pad: int, share_prefix: bool):
    """One forward pass of all rows (right-padded): the logits at each row's last real token,
    the cache, and where each row's real tokens end in it. The rows' common head runs once and
    its keys/values are repeated for every row."""
    p, b = common_prefix_len(rows) if share_prefix else 0, len(rows)
    if p:
        head = [ConcatenateKVCache() for _ in lm.layers]
        lm.model(mx.array([rows[0][:p]]), cache=head, position_ids=text_positions(0, 1, p))
        cache = repeated_cache([c.keys for c in head], [c.values for c in head], b)
    else:
        cache = [ConcatenateKVCache() for _ in lm.layers]
    ids, last = _right_pad([r[p:] for r in rows], pad)
    h = lm.model(ids, cache=cache, position_ids=text_positions(p, b, ids.shape[1]))
    h_last = mx.take_along_axis(h, last[:, None, None], axis=1)[:, 0, :]
    return lm_head(lm, h_last), cache, p + last + 1


def _continue(lm, cache, ends: mx.array, tokens: mx.array) -> mx.array:
    """Logits after appending `tokens` (B, T) to each row where its real tokens end: the new
    tokens see their row's real tokens and each other causally, never the padding, and sit at
    the positions that follow the row (so the result equals running each row whole)."""
    b, t = tokens.shape
    width = cache[0].keys.shape[2]
    col = mx.arange(width + t)[None, None, :]
    q = mx.arange(t)[None, :, None]
    keep = (col < ends[:, None, None]) | ((col >= width) & (col - width <= q))
    pos = mx.broadcast_to((ends[:, None] + mx.arange(t)[None, :])[None], (3, b, t))
    h = lm.model(tokens, cache=cache, mask=keep[:, None], position_ids=pos)
    return lm_head(lm, h[:, -1, :])


def blind_scores_vlm(model, tokenizer, reasonings: Sequence[str | None],
                     max_tokens: int = 1024, share_prefix: bool = True,
                     decimals: bool = True) -> np.ndarray:
    """s_text for each reasoning with a Qwen2.5-VL language model (NaN where there is none).

    The judge writes in the answer format ("3.9"), so its leading digit alone is the floor of
    what it means: a reasoning that implies 3.9 reads as ~3.1, and a consistency reward against
    that pulls every answer's decimals down. With `decimals` each row then gets its most likely
    leading digit and the dot appended (two tokens on the cache, padding masked out) and the
    first decimal's distribution is read: s_text = Σ p(d)·d + E[decimal]/10, the expected
    read-out's formula (`scoring.digits_value`).
    `share_prefix=False` runs every row whole (bench/judge_speed.py's baseline)."""
    out = np.full(len(reasonings), np.nan)
    keep = [i for i, r in enumerate(reasonings) if r and r.strip()]
    if not keep:
        return out
    texts = judge_texts(tokenizer, [reasonings[i] for i in keep])
    # Keep the tail (the reasoning's end and the open answer tag) if a reasoning is very long.
    rows = [tokenizer.encode(t, add_special_tokens=False)[-max_tokens:] for t in texts]
    lm, pad = model.language_model, tokenizer.pad_token_id or 0
    logits, cache, ends = _judge_pass(lm, rows, pad, share_prefix)
    lead = digit_probs(logits, score_token_ids(tokenizer))
    tail = []
    if decimals:
        *digit_ids, dot = single_token_ids(tokenizer, "0123456789.", "the judge's decimals")
        tokens = mx.array([[digit_ids[int(d) + 1], dot] for d in lead.argmax(-1)])
        tail = [digit_probs(_continue(lm, cache, ends, tokens), digit_ids)]
    out[keep] = digits_value(lead, tail)
    return out


def blind_scores_lm(model, tokenizer, reasonings: Sequence[str | None]) -> np.ndarray:
    """s_text with a text-only mlx-lm model (its own chat template, one digit reply)."""
    out = np.full(len(reasonings), np.nan)
    keep = [i for i, r in enumerate(reasonings) if r and r.strip()]
    if not keep:
        return out
    rows = []
    for i in keep:
        msg = f"{JUDGE_PROMPT}\n\nAssessment: {reasonings[i]}\n\nReply with one digit from 1 to 5."
        text = tokenizer.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                             add_generation_prompt=True)
        rows.append(tokenizer.encode(text, add_special_tokens=False))
    ids, last = _right_pad(rows, tokenizer.pad_token_id or 0)
    logits = model(ids)
    last_logits = mx.take_along_axis(logits, last[:, None, None], axis=1)[:, 0, :]
    s = expected_score(last_logits, score_token_ids(tokenizer))
    out[keep] = np.array(s.tolist())
    return out


def make_judge(kind: str, policy, tokenizer, reference=None) -> Judge:
    """`policy` (the model being trained), `reference` (the KL reference policy: `reference(model)`
    is the context manager the trainer uses for it) or an mlx-lm model id (asked for one digit
    from 1 to 5)."""
    if kind == "policy":
        return lambda rs: blind_scores_vlm(policy, tokenizer, rs)
    if kind == "reference":
        if reference is None:
            raise ValueError("judge 'reference' needs the reference-policy context")

        def ref_judge(rs):
            with reference(policy):
                return blind_scores_vlm(policy, tokenizer, rs)
        return ref_judge
    from mlx_lm import load as lm_load

    lm_model, lm_tok = lm_load(kind)
    return lambda rs: blind_scores_lm(lm_model, lm_tok, rs)

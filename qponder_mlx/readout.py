"""Reading a score from the model's digit probabilities: the maths scoring and the GRPO judge share.

Qwen's digits are single tokens, so the probability of each leading digit 1–5 (and of each
decimal 0–9) is one softmax entry. The expected value of the answer under those probabilities is
Q-Align's read-out (Wu et al. 2023, arXiv 2312.17090) applied to our `<answer>X.XX</answer>`
format: fast mode reads it after `<think></think><answer>`, the expected read-out reads it where
the model wrote its number, the GRPO judge reads it after a reasoning it was handed.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np


def single_token_ids(tokenizer, chars: str, needed_by: str) -> list[int]:
    """The token id of each character; each must be a single token (true for Qwen's digits)."""
    ids = []
    for c in chars:
        enc = tokenizer.encode(c, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"{c!r} is not a single token ({enc}); {needed_by} needs it")
        ids.append(enc[0])
    return ids


def score_token_ids(tokenizer) -> list[int]:
    """Token ids of the digits 1..5 (fast mode and the blind judge read their probabilities)."""
    return single_token_ids(tokenizer, "12345", "fast mode")


def _answer_run(ids: Sequence[int], digit_of: dict[int, int], dot_id: int,
                written: float) -> int | None:
    """Start of the last run of digit/dot tokens that spells `written` as d[.ddd]."""
    found, i = None, 0
    while i < len(ids):
        if ids[i] not in digit_of:
            i += 1
            continue
        j = i
        while j < len(ids) and (ids[j] in digit_of or ids[j] == dot_id):
            j += 1
        run = "".join("." if t == dot_id else str(digit_of[t]) for t in ids[i:j])
        lead_ok = j - i == 1 or ids[i + 1] == dot_id
        try:
            if lead_ok and abs(float(run) - written) < 1e-9:
                found = i
        except ValueError:  # "3..2", "4."
            pass
        i = j
    return found


def expected_answer(ids: Sequence[int], watch: Sequence[Sequence[float]], written: float | None,
                    digit_ids: Sequence[int], dot_id: int) -> float | None:
    """E[answer] under the model's digit probabilities where it wrote its answer (Q-Align's idea).

    `watch[t]` holds log p of the digits 0..9 (`digit_ids`) at generated position t. The answer is
    the last digit run spelling `written`; with p the distribution at each of its digits:
    E = Σ_{d=1..5} p(d)·d over the leading digit (renormalised over 1–5) + Σ_k 10⁻ᵏ·E[k-th
    decimal] (renormalised over 0–9), clipped to [1, 5]. The decimals' distributions are the ones
    on the written path, i.e. given the written leading digit — one greedy decode, no extra
    forward pass. None when there is no written answer or its digits cannot be found.
    """
    if written is None:
        return None
    digit_of = {t: d for d, t in enumerate(digit_ids)}
    start = _answer_run(ids, digit_of, dot_id, written)
    if start is None:
        return None
    lead = np.exp(np.asarray(watch[start], dtype=np.float64))[1:6]
    decimals, t = [], start + 2
    while t < len(ids) and ids[t] in digit_of:
        decimals.append(np.exp(np.asarray(watch[t], dtype=np.float64)))
        t += 1
    return float(digits_value(lead, decimals))


def digits_value(lead: np.ndarray, decimals: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Σ_{d=1..5} p(d)·d + Σ_k 10⁻ᵏ·E[k-th decimal], clipped to [1, 5].

    `lead` (..., 5): weights of the leading digits 1–5; each of `decimals` (..., 10): weights of
    the digits 0–9 at the k-th decimal. Both are renormalised here. The one formula behind the
    expected read-out and the GRPO judge's implied score.
    """
    lead = np.asarray(lead, dtype=np.float64)
    value = (lead / lead.sum(-1, keepdims=True)) @ np.arange(1, 6)
    for k, q in enumerate(decimals, start=1):
        q = np.asarray(q, dtype=np.float64)
        value = value + (q / q.sum(-1, keepdims=True)) @ np.arange(10) / 10 ** k
    return np.clip(value, 1.0, 5.0)


def digit_probs(logits: mx.array, ids: Sequence[int]) -> np.ndarray:
    """Softmax restricted to the digit tokens `ids`: (B, V) logits -> (B, len(ids)) float64."""
    return np.array(mx.softmax(logits[:, mx.array(ids)].astype(mx.float32), axis=-1),
                    dtype=np.float64)


def expected_score(logits: mx.array, digit_ids: Sequence[int]) -> mx.array:
    """E[d] under the softmax restricted to the digit tokens: (B, V) -> (B,)."""
    p = mx.softmax(logits[:, mx.array(digit_ids)].astype(mx.float32), axis=-1)
    return (p * mx.arange(1, len(digit_ids) + 1, dtype=mx.float32)).sum(axis=-1)

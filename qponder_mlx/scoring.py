"""Score images: `reason` (generate the full <think>…<answer> reply) or `fast` (one forward pass).

`fast` writes the answer prefix `<think></think><answer>` for the model and reads the next-token
probabilities of the digits 1–5: score = Σ p(d)·d / Σ p(d) — the Q-Align / DeQA-Score idea applied
to our answer format. It skips reasoning, so it costs one prefill instead of hundreds of decode
steps.

`reason` mode reads the score one of two ways (`readout`): `text`, the number the model wrote (the
paper's read-out), or `expected`, the expected value of that number under the model's own digit
probabilities at the positions where it wrote them (`expected_answer`). The decode is the same
greedy one, so an `expected` run also reports the written number (`ScoreResult.written`).

Images are loaded and resized by the pixel policy on the CPU, grouped by resized size (same size =
same input length, so rows batch without padding), and run `batch_size` at a time. A bad image
becomes a result with `error` set; it never stops the batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from qponder_mlx import generate as gen
from qponder_mlx.images import ImageError, PixelPolicy, load_image
from qponder_mlx.model import DEFAULT_MODEL, LoadedModel, load_model
from qponder_mlx.prompts import (
    FAST_ANSWER_PREFIX,
    PROMPT_VERSION,
    SYSTEM_PROMPT,
    USER_PROMPT,
    chat_messages,
    parse_response,
)

MODES = ("reason", "fast")
READOUTS = ("text", "expected")


@dataclass
class ScoreResult:
    key: str  # the path (or caller-given id) of the image
    score: float | None = None
    reasoning: str | None = None
    format_ok: bool = False
    text: str = ""
    error: str | None = None
    seconds: float = 0.0  # this image's share of its batch's wall time
    tokens: int = 0  # generated tokens
    written: float | None = None  # reason mode: the number in the answer (= score for "text")


@dataclass
class ScoreConfig:
    mode: str = "reason"
    batch_size: int = 8
    sampling: gen.SamplingConfig = field(default_factory=gen.SamplingConfig)
    pixels: PixelPolicy = field(default_factory=PixelPolicy)
    user_prompt: str = USER_PROMPT
    system_prompt: str = SYSTEM_PROMPT
    prompt_version: str = PROMPT_VERSION
    readout: str = "text"  # reason mode: "text" (the written number) or "expected"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}")
        if self.mode == "fast" and self.readout != "text":
            raise ValueError("readout 'expected' is for reason mode; fast mode already reads the "
                             "expected leading digit — drop the readout or use mode 'reason'")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


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


def expected_score(logits: mx.array, digit_ids: Sequence[int]) -> mx.array:
    """E[d] under the softmax restricted to the digit tokens: (B, V) -> (B,)."""
    p = mx.softmax(logits[:, mx.array(digit_ids)].astype(mx.float32), axis=-1)
    return (p * mx.arange(1, len(digit_ids) + 1, dtype=mx.float32)).sum(axis=-1)


class Scorer:
    """Scores images with a loaded model. `Scorer.load(...).score(paths)` is the Python API."""

    def __init__(self, loaded: LoadedModel, config: ScoreConfig | None = None):
        self.loaded = loaded
        self.config = config or ScoreConfig()
        tok = loaded.tokenizer
        self.prompt = tok.apply_chat_template(
            chat_messages(self.config.user_prompt, self.config.system_prompt),
            tokenize=False, add_generation_prompt=True)
        if self.config.mode == "fast":
            self.prompt += FAST_ANSWER_PREFIX
            self.digit_ids = score_token_ids(tok)
        if self.config.readout == "expected":
            *self.watch_ids, self.dot_id = single_token_ids(tok, "0123456789.",
                                                           "the expected read-out")
        # The prompt text before the image runs through the model once, not once per photo.
        self.prefix = gen.PrefixCache(loaded.model.config.image_token_id)

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, adapter: str | Path | None = None, *,
             bundle: str | Path | None = None, verify: bool = True, **config) -> Scorer:
        """Load a model (or a verified bundle) and return a Scorer; kwargs fill ScoreConfig."""
        if bundle is not None:
            from qponder_mlx.export.bundle import load_bundle  # export issue fills this in

            loaded = load_bundle(bundle, verify=verify)
        else:
            loaded = load_model(model, adapter)
        return cls(loaded, ScoreConfig(**config))

    @property
    def identity(self) -> str:
        """What a stored score depends on: weights, mode, prompt version, the pixels the model
        sees and (reason mode) the answer's token budget and temperature."""
        c = self.config
        px = f"px{c.pixels.min_pixels}-{c.pixels.max_pixels}"
        parts = [self.loaded.identity, c.mode, c.prompt_version, px]
        if c.mode == "reason":
            parts.append(f"t{c.sampling.max_tokens}@{c.sampling.temperature:g}")
        if c.readout != "text":  # text read-outs keep the identities stored before this option
            parts.append(c.readout)
        return ":".join(parts)

    def score(self, items: Iterable[str | Path | Image.Image]) -> list[ScoreResult]:
        return list(self.score_iter(items))

    def score_iter(self, items: Iterable[str | Path | Image.Image],
                   chunk: int | None = None) -> Iterator[ScoreResult]:
        """Yield one result per item, in input order, `chunk` items loaded at a time."""
        chunk = chunk or self.config.batch_size * 4
        buf: list[str | Path | Image.Image] = []
        for item in items:
            buf.append(item)
            if len(buf) >= chunk:
                yield from self._score_chunk(buf)
                buf = []
        if buf:
            yield from self._score_chunk(buf)

    def _prepare(self, item) -> tuple[str, Image.Image | None, str | None]:
        key = str(item) if not isinstance(item, Image.Image) else f"<image {id(item)}>"
        try:
            img = item if isinstance(item, Image.Image) else load_image(item)
            return key, self.config.pixels.resize(img.convert("RGB"), name=key), None
        except ImageError as e:
            return key, None, str(e)
        except OSError as e:  # permission, I/O: one image's problem, never the job's
            return key, None, f"{key}: {e.strerror or e} — check the file"

    def _score_chunk(self, items: Sequence) -> list[ScoreResult]:
        prepared = [self._prepare(it) for it in items]
        results = [ScoreResult(key=k, error=err) for k, _, err in prepared]
        ok = [i for i, (_, img, _) in enumerate(prepared) if img is not None]
        sizes = [prepared[i][1].size for i in ok]
        for batch in gen.bucket_by_length(sizes, self.config.batch_size):
            rows = [ok[j] for j in batch]
            t0 = time.perf_counter()
            imgs = [prepared[i][1] for i in rows]
            try:
                scored = self._run(imgs)
            except Exception as e:  # noqa: BLE001 — a model failure on one batch is reported per image
                scored = [ScoreResult(key="", error=f"model failed: {type(e).__name__}: {e}")
                          for _ in rows]
            dt = (time.perf_counter() - t0) / len(rows)
            for i, r in zip(rows, scored):
                r.key, r.seconds = results[i].key, dt
                results[i] = r
        return results

    def _run(self, images: list[Image.Image]) -> list[ScoreResult]:
        m, proc = self.loaded.model, self.loaded.processor
        if self.config.mode == "fast":
            inputs = gen.encode(proc, [self.prompt] * len(images), images)
            logits = gen.prefill_logits(m, inputs, self.prefix)
            scores = expected_score(logits, self.digit_ids).tolist()
            return [ScoreResult(key="", score=round(s, 4), format_ok=True) for s in scores]
        expected = self.config.readout == "expected"
        comps = gen.generate_rows(m, proc, [self.prompt] * len(images), images,
                                  self.config.sampling, prefix=self.prefix,
                                  watch_ids=self.watch_ids if expected else None)
        out = []
        for (c,) in comps:
            p = parse_response(c.text)
            score = p.score
            if expected and p.score is not None:
                e = expected_answer(c.token_ids, c.watch, p.score, self.watch_ids, self.dot_id)
                # A written answer whose digits cannot be found among the generated tokens (a
                # tokenizer that merges digits) keeps its written value.
                score = p.score if e is None else round(e, 4)
            out.append(ScoreResult(key="", score=score, reasoning=p.reasoning,
                                   format_ok=p.format_ok, text=c.text, tokens=len(c.token_ids),
                                   written=p.score))
        return out

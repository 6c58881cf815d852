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
from qponder_mlx.readout import (
    expected_answer,
    expected_score,
    score_token_ids,
    single_token_ids,
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
    def load(cls, model: str = DEFAULT_MODEL, adapter: str | Path | None = None,
             **config) -> Scorer:
        """Load a model (repo id or folder, optional LoRA adapter) and return a Scorer; kwargs
        fill ScoreConfig. A shipped bundle loads with `qponder_mlx.export.load_bundle`, then
        `Scorer(loaded, ScoreConfig(...))`."""
        return cls(load_model(model, adapter), ScoreConfig(**config))

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

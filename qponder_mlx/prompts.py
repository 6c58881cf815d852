"""The expert prompt, the response format and its one parse rule.

Everything that reads a model's answer (eval, score, rewards, distill filtering, bundles) goes
through `parse_response`, so there is exactly one definition of a well-formed answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROMPT_VERSION = "qponder-v2"  # v2: the instruction comes before the image (shared prefix)
SCORE_MIN, SCORE_MAX = 1.0, 5.0

SYSTEM_PROMPT = "You are an expert in image quality assessment."

USER_PROMPT = (
    "Assess the technical quality of this photo. Reason step by step about: focus and sharpness; "
    "noise; exposure and dynamic range; colour; compression and other artifacts; composition. "
    "Then rate the overall quality from 1 (bad) to 5 (excellent) with two decimals. "
    "Reply exactly as <think>your reasoning</think><answer>X.XX</answer>."
)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# The answer prefix that "fast" scoring writes for the model: an empty reasoning block and an
# open answer tag, so the next token is the score's leading digit.
FAST_ANSWER_PREFIX = f"{THINK_OPEN}{THINK_CLOSE}{ANSWER_OPEN}"

PARSE_RULE = (
    "format_ok iff the whole text is one <think>...</think> block followed by one "
    "<answer>...</answer> block (whitespace allowed around and inside), the answer holds only a "
    "decimal number and it lies in [1, 5]; score = the number in the last <answer> block if it "
    "parses and lies in [1, 5], else null (never clamped)."
)

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_NUMBER_RE = re.compile(rf"\s*({_NUMBER})\s*")
_TAG_RE = re.compile(r"</?(?:think|answer)>")
_WELL_FORMED_RE = re.compile(
    rf"\s*<think>(.*?)</think>\s*<answer>\s*{_NUMBER}\s*</answer>\s*", re.DOTALL)


@dataclass(frozen=True)
class ParsedResponse:
    reasoning: str | None
    score: float | None
    format_ok: bool


def _answer_number(inner: str) -> float | None:
    m = _NUMBER_RE.fullmatch(inner)
    if m is None:
        return None
    value = float(m.group(1))
    return value if SCORE_MIN <= value <= SCORE_MAX else None


def _blocks(text: str, open_tag: str, close_tag: str) -> list[str]:
    """Insides of the non-overlapping open…close blocks, left to right (what a lazy
    `open(.*?)close` findall returns), in linear time: the regex rescans the rest of the text
    from every unclosed open tag, which took 35 s on a 112 kB reply of repeated tags."""
    out, pos = [], 0
    while (i := text.find(open_tag, pos)) >= 0:
        j = text.find(close_tag, i + len(open_tag))
        if j < 0:  # no close after this open, so none after any later open either
            break
        out.append(text[i + len(open_tag):j])
        pos = j + len(close_tag)
    return out


# The number that opens an answer block: group 1 = the whole number, group 2 = its decimals.
_ANSWER_NUMBER_RE = re.compile(r"\s*(\d+(?:\.(\d+))?)")


def answer_number_span(text: str, part: str = "decimals") -> tuple[int, int] | None:
    """Character span of the number that opens the last answer block, closed or not: part
    "number" -> all of it ("3.72" -> "3.72"), "decimals" -> the digits after its point ("72");
    None when there is no such number (or, for "decimals", no digits after a point)."""
    if part not in ("number", "decimals"):
        raise ValueError(f"part must be 'number' or 'decimals', got {part!r}")
    i = text.rfind(ANSWER_OPEN)
    if i < 0:
        return None
    m = _ANSWER_NUMBER_RE.match(text, i + len(ANSWER_OPEN))
    if m is None or m.start(1 if part == "number" else 2) < 0:
        return None
    return m.span(1 if part == "number" else 2)


def parse_response(text: str) -> ParsedResponse:
    """Parse `<think>…</think><answer>X.XX</answer>` (see PARSE_RULE)."""
    thinks = _blocks(text, THINK_OPEN, THINK_CLOSE)
    reasoning = thinks[0].strip() if thinks else None
    answers = _blocks(text, ANSWER_OPEN, ANSWER_CLOSE)
    score = _answer_number(answers[-1]) if answers else None
    # Exactly one of each tag: the whole-text regex alone would accept a nested "<think>" inside
    # the reasoning, so count the tags too.
    tags = _TAG_RE.findall(text)
    format_ok = (
        score is not None
        and tags == [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE]
        and _WELL_FORMED_RE.fullmatch(text) is not None
    )
    return ParsedResponse(reasoning=reasoning, score=score, format_ok=format_ok)


def format_response(reasoning: str, score: float) -> str:
    """The canonical answer text for a reasoning and a score (used for SFT targets)."""
    return f"{THINK_OPEN}{reasoning.strip()}{THINK_CLOSE}{ANSWER_OPEN}{score:.2f}{ANSWER_CLOSE}"


def chat_messages(user_prompt: str = USER_PROMPT, system_prompt: str | None = SYSTEM_PROMPT,
                  answer: str | None = None) -> list[dict]:
    """Chat messages in the structured (image part + text part) form mlx-vlm trains on."""
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    # Instruction first, image last: the text before the image is then identical for every
    # photo, so its keys/values are computed once and reused (generate.PrefixCache).
    messages.append({"role": "user", "content": [{"type": "text", "text": user_prompt},
                                                 {"type": "image"}]})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages

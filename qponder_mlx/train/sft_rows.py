"""SFT rows: read and check the chat-format JSONL, encode rows exactly as inference does, batch.

A row is what `qponder distill` writes (mlx-vlm's chat format):

    {"images": ["img.jpg"], "messages": [{"role": "system", ...},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]},
     {"role": "assistant", "content": "<think>…</think><answer>3.72</answer>"}],
     "id": ..., "mos": ...}

mlx-vlm's own dataset rows train too: string contents (or text parts only) plus an `images`
list, and `conversations` for `messages`. The image then goes where mlx-vlm's prompt helper puts
it (`mlx_vlm.prompt_utils.apply_chat_template`, which `mlx_vlm`'s trainer calls with
`num_images=len(images)`): into the last user message, before the text for qwen2_5_vl and after
it for qwen2_vl — so such a row trains on the very prompt mlx-vlm's trainer would build.

Image paths are relative to the JSONL's folder or absolute. The prompt is the tokenizer's chat
template of every message but the last, with the generation prompt, i.e. the very text
`Scorer` sends; the image goes through `load_image` + `PixelPolicy.resize` + the processor
(`generate.encode`). The supervised tokens are the assistant's answer and its closing
`<|im_end|>`: everything before (system, user, image tokens, `<|im_start|>assistant\\n`) is
masked, and the template's trailing newline is dropped (it is never predicted at inference).

Reading checks every row up front (JSON, an assistant turn, one image that exists and opens,
the length against max_seq_len) without decoding pixels; a bad row becomes a `RowProblem`
(skipped, counted, reported), never an abort.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image, UnidentifiedImageError

from qponder_mlx import generate as gen
from qponder_mlx.images import MAX_IMAGE_PIXELS, ImageError, PixelPolicy, ensure_heif_support
from qponder_mlx.images import load_image as _load_image

IM_END = "<|im_end|>"


class SFTDataError(ValueError):
    """The data cannot be trained on at all (missing file, no usable row); one line."""


@dataclass(frozen=True)
class RowProblem:
    file: str
    line: int | None
    kind: str  # json | no_assistant | image | too_long | format
    message: str

    def __str__(self) -> str:
        where = f"{self.file} line {self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "kind": self.kind, "message": self.message}


@dataclass
class SFTRow:
    id: str
    image: Path
    prompt: str  # chat template up to and including "<|im_start|>assistant\n"
    answer_ids: list[int]  # the assistant tokens, ending with <|im_end|>
    length: int  # total tokens once the image placeholder is expanded
    mos: float | None = None
    line: int | None = None


@dataclass
class Batch:
    input_ids: mx.array  # (B, L), right-padded
    attention_mask: mx.array  # (B, L) int32, 1 on real tokens
    pixel_values: mx.array
    image_grid_thw: mx.array
    positions: mx.array  # (N,) flat b*L + t of the positions whose next token is supervised
    targets: mx.array  # (N,) the supervised next tokens
    n_tokens: int  # real input tokens (image tokens included)
    n_supervised: int
    ids: list[str]
    # Leading tokens every row shares, all before the first image token (system prompt and
    # instruction): the loss runs them once for the whole batch. 0 = run every row in full.
    shared_prefix: int = 0
    # The rows' image features in row order (the frozen tower's output, train/image_features),
    # or None: the model computes them from pixel_values.
    image_features: mx.array | None = None


def _text_of(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [c.get("text", "") for c in content if isinstance(c, dict)
                 and c.get("type", "text") == "text"]
        return "".join(parts) if parts else None
    return None


def _has_image_part(message: dict) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(
        isinstance(c, dict) and (c.get("type") == "image" or "image" in c) for c in content)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header only; one-line ImageError for anything unusable."""
    ensure_heif_support()
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file — check the path") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied — fix the file permissions") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image — point at an image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = "not an image or an unsupported format" if isinstance(
            e, UnidentifiedImageError) else f"unreadable ({' '.join(str(e).split())})"
        raise ImageError(f"{path}: {reason} — convert it to JPEG/PNG or remove it") from None
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(f"{path}: {w}x{h} exceeds the {MAX_IMAGE_PIXELS:,}-pixel limit — "
                         "downscale it")
    return w, h


def _tokens(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def place_image(messages: list[dict], model_type: str) -> list[dict]:
    """The prompt messages with one image part where mlx-vlm's prompt helper puts it (see the
    module doc); messages that already carry an image part are returned unchanged."""
    if any(_has_image_part(m) for m in messages):
        return messages
    from mlx_vlm.prompt_utils import apply_chat_template

    return apply_chat_template(None, {"model_type": model_type}, messages,
                               return_messages=True, num_images=1)


def parse_row(row: Any, base: Path, tokenizer, pixels: PixelPolicy, max_seq_len: int,
              file: str, line: int, *, model_type: str = "qwen2_5_vl") -> SFTRow | RowProblem:
    """One JSONL object -> an SFTRow, or the RowProblem that makes it unusable.

    `model_type` (the model config's) decides where an mlx-vlm row's image goes."""

    def problem(kind: str, msg: str) -> RowProblem:
        return RowProblem(file, line, kind, msg)

    if not isinstance(row, dict):
        return problem("json", "not a JSON object — each line must be one {...} row")
    messages = row.get("messages", row.get("conversations"))
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) for m in messages):
        return problem("format", "no 'messages' list of {role, content} objects")
    last = messages[-1]
    if last.get("role") != "assistant":
        return problem("no_assistant", "no assistant turn (the last message must have role "
                                       "'assistant') — nothing to learn from this row")
    answer = _text_of(last.get("content"))
    if not answer or not answer.strip():
        return problem("no_assistant", "the assistant message is empty")
    images = row.get("images", row.get("image"))
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str):
        n = len(images) if isinstance(images, list) else 0
        return problem("format", f"needs exactly one image path in 'images', got {n}")
    if sum(_has_image_part(m) for m in messages[:-1]) > 1:
        return problem("format", "several messages carry an image part — keep one "
                                 "{'type': 'image'} (or none: the image then goes where "
                                 "mlx-vlm puts it)")
    if not any(m.get("role") == "user" for m in messages[:-1]):
        return problem("format", "no user message before the assistant's — the image goes "
                                 "into the user turn")
    path = Path(images[0]).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        size = image_size(path)
        n_image = pixels.token_count(size)
    except ImageError as e:
        return problem("image", str(e))

    prompt_msgs = place_image(messages[:-1], model_type)
    full_msgs = [*prompt_msgs, {"role": "assistant", "content": answer}]
    prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template(full_msgs, tokenize=False, add_generation_prompt=False)
    if not full.startswith(prompt):
        return problem("format", "the chat template does not put the answer after the "
                                 "generation prompt — unsupported template")
    p_ids, f_ids = _tokens(tokenizer, prompt), _tokens(tokenizer, full)
    if f_ids[:len(p_ids)] != p_ids:
        return problem("format", "the prompt tokenizes differently inside the full "
                                 "conversation — unsupported template")
    answer_ids = f_ids[len(p_ids):]
    end = tokenizer.convert_tokens_to_ids(IM_END)
    if end not in answer_ids:
        return problem("format", f"the template did not close the assistant turn with {IM_END}")
    answer_ids = answer_ids[:answer_ids.index(end) + 1]
    length = len(p_ids) - 1 + n_image + len(answer_ids)
    if length > max_seq_len:
        return problem("too_long", f"{length} tokens (prompt + {n_image} image tokens + "
                                   f"{len(answer_ids)} answer tokens) > max_seq_len "
                                   f"{max_seq_len} — raise max_seq_len or lower max_pixels")
    mos = row.get("mos")
    mos = float(mos) if isinstance(mos, (int, float)) and not isinstance(mos, bool) else None
    rid = row.get("id")
    return SFTRow(id=str(rid) if rid is not None else f"line{line}", image=path, prompt=prompt,
                  answer_ids=answer_ids, length=length, mos=mos, line=line)


def read_sft_rows(path: str | Path, tokenizer, pixels: PixelPolicy, max_seq_len: int, *,
                  model_type: str = "qwen2_5_vl") -> tuple[list[SFTRow], list[RowProblem]]:
    """Every usable row of a chat-format JSONL file, and a problem for every other one.

    `model_type`: the model config's (where an mlx-vlm dataset row's image goes)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SFTDataError(f"{path}: no such data file — check --data") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SFTDataError(f"{path}: cannot read ({e}) — pass a UTF-8 JSONL file") from None
    rows: list[SFTRow] = []
    problems: list[RowProblem] = []
    base = path.resolve().parent
    for i, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            torn = i == len(lines)
            why = "a torn last line (a writer killed mid-row)" if torn else f"({e.msg})"
            problems.append(RowProblem(str(path), i, "json", f"not valid JSON {why} — fix or "
                                                             "delete the line"))
            continue
        out = parse_row(obj, base, tokenizer, pixels, max_seq_len, str(path), i,
                        model_type=model_type)
        (rows if isinstance(out, SFTRow) else problems).append(out)
    return rows, problems


def problem_summary(n_rows: int, problems: list[RowProblem]) -> str:
    """"120 usable rows, 3 skipped (1 image, 2 too_long)"."""
    counts = Counter(p.kind for p in problems)
    detail = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    return f"{n_rows} usable rows, {len(problems)} skipped" + (f" ({detail})" if detail else "")


# ---------------------------------------------------------------- encoding and batching


@dataclass
class EncodedRow:
    input_ids: np.ndarray  # (L,) int32
    n_prompt: int  # tokens before the first supervised one
    pixel_values: mx.array
    image_grid_thw: mx.array  # (1, 3)


def encode_row(processor, row: SFTRow, pixels: PixelPolicy) -> EncodedRow:
    """Load + resize the image and encode the prompt exactly as `Scorer` does; add the answer.

    Raises ImageError (one line) if the image cannot be decoded.
    """
    img = pixels.resize(_load_image(row.image), name=str(row.image))
    inputs = gen.encode(processor, [row.prompt], [img])
    prompt_ids = np.array(inputs["input_ids"][0], dtype=np.int32)
    ids = np.concatenate([prompt_ids, np.array(row.answer_ids, dtype=np.int32)])
    return EncodedRow(ids, len(prompt_ids), inputs["pixel_values"], inputs["image_grid_thw"])


def collate(rows: list[EncodedRow], pad_id: int, ids: list[str] | None = None, *,
            image_token_id: int | None = None) -> Batch:
    """Right-pad to the longest row. Position t is supervised when token t+1 is an answer
    token; padding and prompt positions are never selected, so they add nothing to the loss
    (and, the attention being causal, right padding cannot change a real position).
    With `image_token_id`, a batch of several rows records its shared prefix (`Batch`)."""
    B, L = len(rows), max(len(r.input_ids) for r in rows)
    input_ids = np.full((B, L), pad_id, dtype=np.int32)
    mask = np.zeros((B, L), dtype=np.int32)
    pos, tgt = [], []
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[b, :n] = r.input_ids
        mask[b, :n] = 1
        t = np.arange(r.n_prompt - 1, n - 1)
        pos.append(b * L + t)
        tgt.append(r.input_ids[t + 1])
    positions, targets = np.concatenate(pos), np.concatenate(tgt)
    return Batch(
        input_ids=mx.array(input_ids), attention_mask=mx.array(mask),
        pixel_values=mx.concatenate([r.pixel_values for r in rows], axis=0),
        image_grid_thw=mx.concatenate([r.image_grid_thw for r in rows], axis=0),
        positions=mx.array(positions.astype(np.int32)), targets=mx.array(targets),
        n_tokens=int(mask.sum()), n_supervised=len(targets), ids=ids or [],
        # never into the prompt's last token, whose next token is the first supervised one
        shared_prefix=(min(gen.shared_prefix([r.input_ids for r in rows], image_token_id),
                           min(r.n_prompt for r in rows) - 1)
                       if image_token_id is not None and B > 1 else 0))


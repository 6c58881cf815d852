"""Teacher backend: any OpenAI-compatible chat-completions endpoint, through httpx.

vLLM, SGLang, DashScope's compatible mode, LM Studio, Ollama and `mlx_vlm.server` all accept
`POST {base}/chat/completions` with the image as a base64 data URL. httpx gives us the
connection pool and the timeouts; retries live in `retry.py` so every backend shares them.
The API key travels only in the Authorization header and is scrubbed from every error text, as
is a `user:password@` in the URL (httpx sends it as Basic auth; we print the URL without it).

A reply is read as a stream under two bounds, because httpx's timeout bounds each read, not the
request: a server that keeps sending (an endless chunked body, a slow trickle) would otherwise
hold a worker and fill memory without end. The body may be at most `reply_cap(max_tokens)`
bytes, and the whole request must finish within `timeout_s` (checked as each piece arrives, so
the overshoot is at most one gap between two pieces, itself under `timeout_s`).
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image

from qponder_mlx.distill.retry import parse_retry_after
from qponder_mlx.distill.teacher_prompts import TeacherPrompt
from qponder_mlx.distill.teachers import (
    UNREACHABLE,
    FatalTeacherError,
    TeacherError,
    TeacherReply,
    TransientTeacherError,
)
from qponder_mlx.images import load_image
from qponder_mlx.labels import Sample
from qponder_mlx.safe_paths import redact_secrets, redact_url

# ~1 MP: enough to see noise and blur at the teacher's native patch size, small enough for
# hosted APIs' request limits. Downscaling hides fine noise, so raise it for such datasets.
DEFAULT_MAX_PIXELS = 1280 * 28 * 28

# Formats that every OpenAI-compatible server decodes; others are re-encoded as PNG.
_PASS_THROUGH = {"JPEG": "image/jpeg", "PNG": "image/png"}
_ORIENTATION_TAG = 0x0112
# The largest reply body we read, from the token budget: a token is a few characters of text,
# and JSON may spell one character as a 6-byte \uXXXX escape (ensure_ascii servers, CJK text),
# so 16 bytes a token plus 64 KiB for the envelope (ids, usage, a reasoning field) holds any
# honest reply; 1024 tokens -> 80 KiB.
REPLY_BYTES_PER_TOKEN = 16
REPLY_HEADROOM_BYTES = 64 * 1024


def reply_cap(max_tokens: int) -> int:
    return REPLY_HEADROOM_BYTES + REPLY_BYTES_PER_TOKEN * max(1, max_tokens)


_FATAL_STATUS = {401: "check the key (--api-key-env)", 403: "check the key (--api-key-env)",
                 404: "check --teacher-url and --teacher-model"}


@dataclass(frozen=True)
class OpenAIConfig:
    url: str  # base URL such as http://127.0.0.1:8000/v1, or the full .../chat/completions
    model: str
    temperature: float = 0.7
    max_tokens: int = 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout_s: float = 120.0
    concurrency: int = 8  # connection-pool size; the runner decides how many calls are in flight


def chat_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def image_data_url(path, max_pixels: int) -> str:
    """The image as a data URL, at most `max_pixels`, upright, in a format every server reads.

    An upright JPEG/PNG within budget goes byte for byte: re-encoding a JPEG would add the very
    compression artifacts the teacher is asked to judge. Anything else (rotated by EXIF, too
    large, WebP/HEIC/16-bit...) is decoded by `load_image`, downscaled and sent as lossless PNG.
    """
    img = load_image(path)  # validates the file (clear ImageError) and applies EXIF rotation
    with Image.open(path) as raw:
        fmt, mode, size = raw.format, raw.mode, raw.size
        rotated = raw.getexif().get(_ORIENTATION_TAG, 1) not in (1, None)
    w, h = img.size
    if fmt in _PASS_THROUGH and mode in ("RGB", "L") and not rotated and size == img.size \
            and w * h <= max_pixels:
        with open(path, "rb") as f:
            data, mime = f.read(), _PASS_THROUGH[fmt]
    else:
        if w * h > max_pixels:
            scale = (max_pixels / (w * h)) ** 0.5
            img = img.resize((max(1, int(w * scale)), max(1, int(h * scale))),
                             Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class OpenAITeacher:
    """`Teacher` over an OpenAI-compatible endpoint. Thread-safe: one httpx.Client, pooled."""

    max_concurrency = None

    def __init__(self, config: OpenAIConfig, api_key: str | None = None,
                 transport: httpx.BaseTransport | None = None):
        self.config = config
        self.model = config.model
        self.endpoint = chat_url(config.url)
        self.shown_endpoint = redact_url(self.endpoint)  # what messages print
        self._secret = api_key or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        pool = max(1, config.concurrency)
        self._client = httpx.Client(
            headers=headers, transport=transport, follow_redirects=False,
            timeout=httpx.Timeout(config.timeout_s, connect=min(10.0, config.timeout_s)),
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool))

    def __repr__(self) -> str:  # never show the key, even in a debugger or a traceback
        return f"OpenAITeacher(endpoint={self.shown_endpoint!r}, model={self.model!r})"

    def close(self) -> None:
        self._client.close()

    def prepare(self, sample: Sample) -> str:
        return image_data_url(sample.image, self.config.max_pixels)

    def _scrub(self, text: str) -> str:
        text = text.replace(self._secret, "***") if self._secret else text
        return redact_secrets(text, self.endpoint)

    def ask(self, image: str, sample: Sample, prompt: TeacherPrompt) -> TeacherReply:
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": prompt.system},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": prompt.user}]},
            ],
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        deadline = time.monotonic() + self.config.timeout_s
        try:
            with self._client.stream("POST", self.endpoint, json=body) as resp:
                content = self._read_body(resp, deadline)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:  # nothing answers at the URL
            raise TransientTeacherError(
                self._scrub(f"cannot connect ({type(e).__name__}: {e})"), UNREACHABLE
            ) from None
        except httpx.TimeoutException as e:
            raise TransientTeacherError(
                f"timeout after {self.config.timeout_s:g} s ({type(e).__name__})", "timeout"
            ) from None
        except httpx.TransportError as e:  # refused, reset, dropped mid-reply, DNS...
            raise TransientTeacherError(
                self._scrub(f"connection error ({type(e).__name__}: {e})"), "connection"
            ) from None
        return self._reply(resp, content)

    def _read_body(self, resp: httpx.Response, deadline: float) -> bytes:
        """The body, or an error once it passes the size cap or the request's deadline."""
        cap = reply_cap(self.config.max_tokens)
        too_long = TeacherError(
            f"reply larger than {cap:,} bytes, more than max_tokens={self.config.max_tokens} "
            "allows — not kept (a server that never ends its reply, or ignores max_tokens)",
            "too_long")
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise too_long
        pieces, size = [], 0
        for piece in resp.iter_bytes():
            size += len(piece)
            if size > cap:
                raise too_long
            pieces.append(piece)
            if time.monotonic() > deadline:
                raise TransientTeacherError(
                    f"timeout: the reply did not end within {self.config.timeout_s:g} s "
                    f"({size:,} bytes so far)", "timeout")
        return b"".join(pieces)

    def _reply(self, resp: httpx.Response, content: bytes) -> TeacherReply:
        code = resp.status_code
        text = content.decode(resp.encoding or "utf-8", "replace")
        if code != 200:
            detail = self._scrub(" ".join(text.split())[:200])
            reason = f"HTTP {code} {resp.reason_phrase}" + (f": {detail}" if detail else "")
            if code == 429 or code >= 500:
                raise TransientTeacherError(reason, f"http_{code}",
                                            parse_retry_after(resp.headers.get("Retry-After")))
            if code in _FATAL_STATUS:
                raise FatalTeacherError(f"teacher {self.shown_endpoint} answered {reason} — "
                                        f"{_FATAL_STATUS[code]}", f"http_{code}")
            raise TeacherError(reason, f"http_{code}")
        try:
            data = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            snippet = self._scrub(" ".join(text.split())[:80])
            raise TeacherError(f"malformed reply: body is not JSON ({snippet!r})",
                               "malformed") from None
        return self._parse(data)

    def _parse(self, data: Any) -> TeacherReply:
        try:
            choice = data["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise TeacherError("malformed reply: no choices[0].message in the JSON",
                               "malformed") from None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        text = content if isinstance(content, str) else ""
        # Reasoning parsers (vLLM --reasoning-parser, DashScope thinking models) move the
        # <think> block into a separate field; put it back where our format expects it.
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(reasoning, str) and reasoning.strip() and "<think>" not in text:
            text = f"<think>{reasoning.strip()}</think>{text}"
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return TeacherReply(text=text, prompt_tokens=_int(usage.get("prompt_tokens")),
                            completion_tokens=_int(usage.get("completion_tokens")),
                            finish_reason=choice.get("finish_reason"))


# Usage counts are advisory (the summary's token totals): a count that is not a plain,
# finite, non-negative number below 2**53 (`1e999` parses as inf) reads as 0, never an error
# that would throw away a valid answer.
_MAX_COUNT = 2**53


def _int(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return 0
    if isinstance(x, float) and not math.isfinite(x):
        return 0
    return int(x) if 0 <= x < _MAX_COUNT else 0

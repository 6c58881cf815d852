"""A scripted OpenAI chat-completions server for distill tests and the throughput bench.

Each request's image says which sample it is for: test images are solid colours whose red value
is the sample's index, so replies can be scripted per sample while requests arrive concurrently.
A script is a list of steps played in order (the last one repeats): a reply, an HTTP status, a
stall, a dropped connection, a raw body — or a function of the request that returns a step.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image


@dataclass
class Reply:
    text: str | None
    prompt_tokens: int = 100
    completion_tokens: int = 50
    delay: float = 0.0


@dataclass
class Status:
    code: int
    headers: dict[str, str] = field(default_factory=dict)
    body: str = '{"error": {"message": "scripted failure"}}'


@dataclass
class Stall:
    seconds: float  # sleep this long, then answer with `then`
    then: Reply = field(default_factory=lambda: Reply(answer(3.0)))


@dataclass
class Drop:
    """Close the connection without a response."""


@dataclass
class Raw:
    body: bytes
    content_type: str = "text/html"


Step = Reply | Status | Stall | Drop | Raw | Callable[[dict], "Step"]


def answer(score: float, reasoning: str = "The photo is sharp with little noise, balanced "
           "exposure and natural colour.") -> str:
    return f"<think>{reasoning}</think><answer>{score:.2f}</answer>"


def write_index_image(path: Path, index: int, size: tuple[int, int] = (32, 32)) -> Path:
    """A solid PNG whose red channel is `index` (0-255): the server reads it back."""
    Image.new("RGB", size, (index, 120, 60)).save(path)
    return path


def index_of(body: dict) -> int:
    for msg in body.get("messages", []):
        content = msg.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") == "image_url":
                b64 = part["image_url"]["url"].split(",", 1)[1]
                with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
                    return im.convert("RGB").getpixel((0, 0))[0]
    raise ValueError("request has no image")


def user_text(body: dict) -> str:
    for msg in body.get("messages", []):
        if msg.get("role") == "user" and isinstance(msg.get("content"), list):
            return "".join(p.get("text", "") for p in msg["content"] if p.get("type") == "text")
    return ""


@dataclass
class Seen:
    index: int
    t: float  # time.monotonic() when the request arrived
    body: dict


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler that logs nothing and sends a whole response in one call."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class LocalServer:
    """A threaded HTTP server on 127.0.0.1:<free port> answering with the subclass's
    `_handler()`; `with` starts and stops it, `url` is its OpenAI-style base URL."""

    def _listen(self) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._httpd.handle_error = lambda request, address: None  # clients hang up: expected
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class ScriptedServer(LocalServer):
    """`with ScriptedServer(scripts) as srv:` serves on 127.0.0.1:<free port>; `srv.url`."""

    def __init__(self, scripts: dict[int, list[Step]] | None = None, default: Step | None = None,
                 api_key: str | None = None, delay: float = 0.0):
        self.scripts = scripts or {}
        self.default = default or Reply(answer(3.0))
        self.api_key = api_key
        self.delay = delay  # added before every answer (benchmarks, slow servers)
        self.seen: list[Seen] = []
        self._count: defaultdict[int, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._listen()

    def count(self, index: int) -> int:
        with self._lock:
            return self._count[index]

    def times(self, index: int) -> list[float]:
        with self._lock:
            return [s.t for s in self.seen if s.index == index]

    def _next_step(self, body: dict) -> Step:
        index = index_of(body)
        with self._lock:
            n = self._count[index]
            self._count[index] += 1
            self.seen.append(Seen(index, time.monotonic(), body))
        script = self.scripts.get(index, [self.default])
        step = script[min(n, len(script) - 1)]
        return step(body) if callable(step) else step

    def _handler(self):
        server = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    if server.api_key is not None and \
                            self.headers.get("Authorization") != f"Bearer {server.api_key}":
                        self._send(401, b'{"error": "Invalid API key"}', "application/json")
                        return
                    step = server._next_step(json.loads(raw))
                    if server.delay:
                        time.sleep(server.delay)
                    self._play(step, json.loads(raw))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test); nothing to answer

            def _play(self, step: Step, body: dict) -> None:
                if isinstance(step, Drop):
                    self.close_connection = True
                    return
                if isinstance(step, Status):
                    self._send(step.code, step.body.encode(), "application/json", step.headers)
                    return
                if isinstance(step, Raw):
                    self._send(200, step.body, step.content_type)
                    return
                if isinstance(step, Stall):
                    time.sleep(step.seconds)
                    step = step.then
                time.sleep(step.delay)
                payload = {
                    "id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": step.text}}],
                    "usage": {"prompt_tokens": step.prompt_tokens,
                              "completion_tokens": step.completion_tokens,
                              "total_tokens": step.prompt_tokens + step.completion_tokens},
                }
                self._send(200, json.dumps(payload).encode(), "application/json")

        return Handler

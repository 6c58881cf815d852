"""Misbehaving OpenAI-compatible servers on 127.0.0.1, for the teacher-bounds tests.

Raw sockets, not http.server: the faults are in how the bytes arrive (a chunked body that never
ends, one byte at a time, a Content-Length of 50 MB), which a framework would smooth over.
Each server runs in a daemon thread, on a free port, and stops (closing every connection it
holds) when the `serve` context exits; `sent` counts the body bytes it managed to send.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


def chat_body(text: str, usage: str = '{"prompt_tokens": 10, "completion_tokens": 5}') -> bytes:
    """A chat-completions body; `usage` is spliced in raw (so it may hold 1e999 or NaN)."""
    head = json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": text},
         "finish_reason": "stop"}]})
    return head[:-1].encode() + b', "usage": ' + usage.encode() + b"}"


@dataclass
class Behaviour:
    kind: str  # "endless" | "trickle" | "huge" | "fixed"
    status: int = 200
    body: bytes = b""
    gap_s: float = 0.05  # trickle: seconds between bytes


@dataclass
class Served:
    url: str
    sent: int = 0  # body bytes sent, all connections together
    requests: int = 0
    stop: threading.Event = field(default_factory=threading.Event)


def _read_request(rfile) -> None:
    length = 0
    while (line := rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    rfile.read(length)


@contextmanager
def serve(behaviour: Behaviour) -> Iterator[Served]:
    served = Served(url="")

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            _read_request(self.rfile)
            served.requests += 1
            b = behaviour
            try:
                if b.kind == "fixed":
                    self._send_head(b.status, {"Content-Length": str(len(b.body))})
                    self._send(b.body)
                elif b.kind == "huge":  # declares 50 MB, then sends it in 1 MiB pieces
                    total = 50 * 1024 * 1024
                    self._send_head(200, {"Content-Length": str(total)})
                    piece = b"x" * (1 << 20)
                    for _ in range(total // len(piece)):
                        if served.stop.is_set():
                            return
                        self._send(piece)
                else:
                    self._send_head(200, {"Transfer-Encoding": "chunked"})
                    piece = b"a" * (64 * 1024) if b.kind == "endless" else b"a"
                    while not served.stop.is_set():
                        self._send(b"%x\r\n%s\r\n" % (len(piece), piece), body=len(piece))
                        if b.kind == "trickle":
                            time.sleep(b.gap_s)
            except OSError:
                return  # the client hung up: what a bounded client must do

        def _send_head(self, status: int, headers: dict[str, str]) -> None:
            lines = [f"HTTP/1.1 {status} X", "Content-Type: application/json",
                     "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
            self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode())

        def _send(self, data: bytes, body: int | None = None) -> None:
            self.wfile.write(data)
            self.wfile.flush()
            served.sent += len(data) if body is None else body

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), Handler)
    served.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield served
    finally:
        served.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""A fault-injecting HTTP proxy for OpenAI chat-completions servers (e.g. the real mlx_vlm.server).

Each request is either forwarded untouched or, with probability `rate`, hit by one fault:

    http_500        500 whose body echoes the request's Authorization header (a leaky server:
                    the client must scrub the key from its error text)
    http_429        429 with Retry-After: 1
    stall           no answer for `stall_s` (longer than the client's timeout), then a hang-up
    drop            the connection closes without a response
    truncated_json  the upstream's 200 reply cut in half (valid length, broken JSON)
    empty_content   the upstream's reply with its message content replaced by ""
    wrong_format    the upstream's reply with content "Score: 3.5/5, looks fine."

The decision is a function of (seed, sample index, request number of that sample), so it does
not depend on how concurrent requests interleave. Samples are told apart by their image (a solid
colour whose red value is the index, see tests/distill_server.py). `log` records every request:
which fault it got, and the content the upstream wrote when it was forwarded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from urllib.parse import urlsplit

from distill_server import LocalServer, QuietHandler, index_of

FAULTS = ("http_500", "http_429", "stall", "drop", "truncated_json", "empty_content",
          "wrong_format")
# Faults a client should retry (after a back-off); the others end the attempt at once.
TRANSIENT = {"http_500": "http_500", "http_429": "http_429", "stall": "timeout",
             "drop": "connection"}
WRONG_FORMAT = "Score: 3.5/5, looks fine."


@dataclass
class Entry:
    index: int  # the sample
    n: int  # 0-based request number of this sample
    fault: str | None
    t: float  # monotonic arrival time
    upstream_status: int | None = None
    upstream_content: str | None = None  # what the real server wrote (forwarded requests)


class FaultProxy(LocalServer):
    """`with FaultProxy("http://127.0.0.1:PORT", seed=1) as p:` then point clients at `p.url`."""

    def __init__(self, upstream: str, *, rate: float = 0.3, seed: int = 0, stall_s: float = 6.0,
                 faults: tuple[str, ...] = FAULTS):
        u = urlsplit(upstream)
        self.upstream_host, self.upstream_port = u.hostname, u.port
        self.rate, self.seed, self.stall_s, self.faults = rate, seed, stall_s, faults
        self.log: list[Entry] = []
        self._count: defaultdict[int, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._listen()

    def decide(self, index: int, n: int) -> str | None:
        rng = random.Random(f"{self.seed}:{index}:{n}")
        hit = rng.random() < self.rate
        fault = self.faults[rng.randrange(len(self.faults))]
        return fault if hit else None

    def entries(self, index: int) -> list[Entry]:
        with self._lock:
            return sorted((e for e in self.log if e.index == index), key=lambda e: e.n)

    def _register(self, body: dict) -> Entry:
        index = index_of(body)
        with self._lock:
            n = self._count[index]
            self._count[index] += 1
            entry = Entry(index, n, self.decide(index, n), time.monotonic())
            self.log.append(entry)
        return entry

    def _forward(self, raw: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=300)
        try:
            conn.request("POST", "/v1/chat/completions", body=raw, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _handler(self):
        proxy = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                # A client that gave up (timeout) has nothing left to answer.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._serve(raw)

            def _serve(self, raw: bytes) -> None:
                entry = proxy._register(json.loads(raw))
                auth = self.headers.get("Authorization", "")
                fault = entry.fault
                if fault == "http_500":
                    leak = json.dumps({"error": "internal error", "request_auth": auth})
                    self._send(500, leak.encode())
                    return
                if fault == "http_429":
                    self._send(429, b'{"error": "rate limited"}', headers={"Retry-After": "1"})
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                    self.close_connection = True
                    return
                if fault == "drop":
                    self.close_connection = True
                    return
                headers = {"Content-Type": "application/json"}
                if auth:
                    headers["Authorization"] = auth
                status, body = proxy._forward(raw, headers)
                entry.upstream_status = status
                if status == 200:
                    data = json.loads(body)
                    entry.upstream_content = data["choices"][0]["message"].get("content")
                    if fault == "empty_content":
                        data["choices"][0]["message"]["content"] = ""
                    elif fault == "wrong_format":
                        data["choices"][0]["message"]["content"] = WRONG_FORMAT
                    body = json.dumps(data).encode()
                    if fault == "truncated_json":
                        body = body[: len(body) // 2]
                self._send(status, body)

        return Handler

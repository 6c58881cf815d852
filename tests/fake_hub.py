"""A stand-in for the Hugging Face Hub's file endpoint, on 127.0.0.1, for offline tests.

Serves `HEAD`/`GET {endpoint}/datasets/<owner>/<name>/resolve/<revision>/<path>` the way the Hub
does for what huggingface_hub's `get_hf_file_metadata`/`hf_hub_download` read: `X-Repo-Commit`,
`ETag` (for LFS files `X-Linked-Etag` = the sha256, `X-Linked-Size`), `Content-Length`, byte
ranges (206 + Content-Range), and 404 with `X-Error-Code: RepoNotFound|EntryNotFound`.

`cut_after[path] = n` makes the next GET of `path` announce the full length and then drop the
connection after n bytes — an interrupted download. The server listens on 127.0.0.1 only,
serves from a daemon thread, and shuts itself down after `lifetime_s` if a test forgets to.
"""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_PATH = re.compile(r"^/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class FakeHub:
    def __init__(self, files: dict[tuple[str, str], bytes], lifetime_s: float = 60.0):
        self.files = dict(files)
        self.cut_after: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.authorization: list[str | None] = []  # the Authorization header of each request
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):  # noqa: N802 — http.server's naming
                self._serve(body=False)

            def do_GET(self):  # noqa: N802
                self._serve(body=True)

            def _serve(self, body: bool):
                rng = self.headers.get("Range")
                hub.requests.append((self.command, self.path, rng))
                hub.authorization.append(self.headers.get("Authorization"))
                m = _PATH.match(self.path.split("?")[0])
                if not m:
                    return self._error(404, "RepoNotFound")
                repo, _rev, path = m.groups()
                if not any(r == repo for r, _ in hub.files):
                    return self._error(404, "RepoNotFound")
                data = hub.files.get((repo, path))
                if data is None:
                    return self._error(404, "EntryNotFound")
                sha = hashlib.sha256(data).hexdigest()
                start = 0
                if rng and body:
                    start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                chunk = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
                if not body:
                    return
                cut = hub.cut_after.pop(path, None)
                if cut is not None:
                    self.wfile.write(chunk[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(chunk)

            def _error(self, status: int, code: str):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True

    def __enter__(self) -> FakeHub:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def gets(self, path_suffix: str) -> list[str | None]:
        """Range headers of the GETs for a file (None: whole file)."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith(path_suffix)]

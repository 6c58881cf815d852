"""A model that cannot come from the hub: the one-line error names the real cause (offline mode,
no network, no such repo, gated, server error), checked against real huggingface_hub calls to a
stand-in hub on 127.0.0.1 and to a port nothing listens on."""

import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from huggingface_hub import constants
from qponder_mlx.cli.main import app
from typer.testing import CliRunner

from qponder_mlx.model import ModelLoadError, resolve_model_path
from qponder_mlx.testing.sft_sets import CC0_IMAGES as CC0

ANSWERS = {  # repo -> (status, X-Error-Code) the stand-in hub answers with
    "someone/missing": (404, "RepoNotFound"),
    "someone/gated": (403, "GatedRepo"),
    "someone/broken": (503, None),
}


class FakeHub(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        repo = next((r for r in ANSWERS if r in self.path), None)
        status, code = ANSWERS.get(repo, (404, "RepoNotFound"))
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        f"http://127.0.0.1:{server.server_port}" + "/{repo_id}/resolve/"
                        "{revision}/{filename}")
    yield
    server.shutdown()


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


def _message(repo: str) -> str:
    with pytest.raises(ModelLoadError) as e:
        resolve_model_path(repo)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(repo)
    return msg


@pytest.mark.parametrize("repo, says", [
    ("someone/missing", "no such repo on the Hugging Face hub"),
    ("someone/gated", "the repo is gated"),
    ("someone/broken", "HTTP 503"),
])
def test_hub_answers_are_told_apart(repo, says, hub, empty_cache):
    msg = _message(repo)
    assert says in msg
    assert "no network" not in msg


def test_no_network_is_not_a_wrong_name(monkeypatch, empty_cache):
    with socket.socket() as s:  # a port that nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    msg = _message("mlx-community/Qwen2.5-VL-3B-Instruct-4bit")
    assert "cannot reach the Hugging Face hub" in msg and "no network" in msg
    assert "check the name" not in msg and "--model /path/to/model" in msg


def test_offline_mode_says_so_and_score_leaves_no_store_behind(monkeypatch, empty_cache,
                                                               tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _message("mlx-community/Qwen2.5-VL-3B-Instruct-4bit")
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in msg and "qponder dev tiny-model" in msg
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(sorted(CC0.iterdir())[0], photos)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["score", str(photos)])
    assert res.exit_code == 2 and "offline mode is on" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "results.sqlite").exists()  # the store waits for a loaded model

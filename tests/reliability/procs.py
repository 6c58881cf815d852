"""Processes the suite starts and stops by their own PID: the real `mlx_vlm.server`, and CLI runs
killed with SIGKILL at a seeded random moment."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlx_vlm_server(model_dir: Path, log_path: Path, api_key: str,
                   max_tokens: int = 32) -> Iterator[str]:
    """The real `mlx_vlm.server` on 127.0.0.1:<free port>, requiring `api_key`; yields its
    base URL (…/v1). Requests must name `str(model_dir)` as their model."""
    port = free_port()
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_vlm.server", "--model", str(model_dir), "--host",
         "127.0.0.1", "--port", str(port), "--max-tokens", str(max_tokens)],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, **OFFLINE, "MLX_VLM_SERVER_API_KEY": api_key})
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlx_vlm.server exited: {log_path.read_text()[-2000:]}")
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/health",
                                             headers={"Authorization": f"Bearer {api_key}"})
                urllib.request.urlopen(req, timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError("mlx_vlm.server did not start in 90 s") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()  # its own PID only
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@contextmanager
def served(model_dir: Path, tmp_dir: Path) -> Iterator[dict]:
    """`mlx_vlm_server` for a module's tests: a fresh random API key, the log in `tmp_dir`;
    yields {"url", "model", "key", "log"} (requests name `model`)."""
    key = f"sk-test-{random.getrandbits(64):016x}"
    log = tmp_dir / "server.log"
    with mlx_vlm_server(model_dir, log, key) as url:
        yield {"url": url, "model": str(model_dir), "key": key, "log": log}


def qponder_cmd(*args) -> list[str]:
    """The real console entry point, as `qponder ARGS` runs it."""
    return [sys.executable, "-c", "from qponder_mlx.cli.main import main; main()",
            *map(str, args)]


@dataclass
class Killed:
    """What one kill -9 trial saw at the moment of the kill."""

    seed: int
    delay_s: float  # chosen delay after the job showed its first progress (or after start)
    after_progress: bool  # the delay counted from the first progress, not the process start
    progress_at_kill: int  # the job's own measure (rows, steps...) when it was killed
    finished_first: bool  # the job ended before the kill: nothing to kill


def run_and_kill(cmd: list[str], *, seed: int, early: bool, progress: Callable[[], int],
                 span_s: float, log_path: Path, env: dict | None = None,
                 cwd: Path | None = None, timeout_s: float = 120.0) -> Killed:
    """Start `cmd`, SIGKILL it at a seeded random moment, wait for it to die.

    The moment: `early`, a delay in [0, 1.5 s) after the start (imports, model load, the first
    writes); otherwise a delay in [0, span_s) after the job's first progress
    (`progress() > 0`), so the kill lands while results are being written. Callers make every
    4th trial an early one, so 3 trials already cover both phases.
    """
    rng = random.Random(seed)
    delay = rng.uniform(0, 1.5) if early else rng.uniform(0, span_s)
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **OFFLINE, **(env or {})}, cwd=cwd)
        try:
            deadline = time.monotonic() + timeout_s
            if not early:
                while progress() <= 0 and proc.poll() is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no progress in {timeout_s:.0f} s: "
                                           f"{log_path.read_text()[-1500:]}")
                    time.sleep(0.01)
            end = time.monotonic() + delay
            while proc.poll() is None and time.monotonic() < end:
                time.sleep(0.005)
            finished = proc.poll() is not None
            if not finished:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:  # the test itself failed: never leave it running
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
    if finished and proc.returncode != 0:
        raise RuntimeError(f"job failed before the kill ({proc.returncode}): "
                           f"{log_path.read_text()[-1500:]}")
    return Killed(seed, round(delay, 3), not early, progress(), finished)

"""Data parallelism with mx.distributed over loopback: two real ranks started by the test."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from qponder_mlx.testing.sft_sets import cc0_sft_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "worker.py"
MLX_LAUNCH = Path(sys.executable).parent / "mlx.launch"
SMALL = {"min_pixels": 3136, "max_pixels": 12544}


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start_ranks(tmp_path, stage, cfg, env_extra=None):
    """Two ranks by hand (MLX_RANK + MLX_HOSTFILE), each in its own working folder, so a
    relative --out shows which rank wrote files."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(2)]))
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    procs = []
    for rank in range(2):
        cwd = tmp_path / f"rank{rank}"
        cwd.mkdir()
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile),
               **(env_extra or {})}
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), stage, str(cfg_path),
             str(tmp_path / f"r{rank}.safetensors")],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def launch_two(*cmd, cwd: Path | None = None, timeout: int = 300) -> str:
    """`mlx.launch --backend ring -n 2 -- CMD`; fails unless both ranks finished. mlx.launch
    exits 0 even when a rank fails, only warning "Node with rank N exited with code C"
    (mlx/_distributed_utils/launch.py), so the warning is checked too. Returns its output."""
    dist = subprocess.run([str(MLX_LAUNCH), "--backend", "ring", "-n", "2", "--",
                           *map(str, cmd)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    said = dist.stdout + dist.stderr
    assert dist.returncode == 0 and "exited with code" not in said, said[-3000:]
    return said


def _weights(path):
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def test_sft_one_step_on_two_ranks_equals_one_process(tiny_model_dir, tmp_path):
    """The user path: `mlx.launch --backend ring -n 2 -- qponder train ...`."""
    data = write_jsonl(tmp_path / "rows.jsonl", cc0_sft_rows(4))
    common = ["train", "--stage", "sft", "--model", str(tiny_model_dir), "--data", str(data),
              "--iters", "1", "--batch-size", "4", "--learning-rate", "1e-2", "--warmup", "0",
              "--min-pixels", "3136", "--max-pixels", "12544", "--no-progress"]
    single = subprocess.run([sys.executable, "-m", "qponder_mlx.cli.main", *common, "--out",
                             str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    launch_two(sys.executable, "-m", "qponder_mlx.cli.main", *common, "--out", tmp_path / "two")
    a = _weights(tmp_path / "one" / "adapters" / "adapters.safetensors")
    b = _weights(tmp_path / "two" / "adapters" / "adapters.safetensors")
    assert a.keys() == b.keys()
    moved = [k for k in a if "lora_b" in k]
    assert any(np.abs(a[k]).max() > 0 for k in moved)
    # Tolerance 1e-4 = 1% of the step (lr 1e-2): the gradient sums are added in another order
    # across ranks, and Adam's g/sqrt(v) amplifies that rounding in near-zero gradient entries.
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-4, err_msg=k)
    assert max(np.abs(b[k] - a[k]).max() for k in a) < 0.01 * 1e-2 * 10


def test_grpo_on_two_ranks_identical_adapters_only_rank0_writes(tiny_model_dir, cc0_labels,
                                                                 tmp_path):
    cfg = {"model": str(tiny_model_dir), "data": str(cc0_labels), "out": "run", "iters": 3,
           "batch_size": 2, "group_size": 3, "max_completion_length": 6,
           "learning_rate": 2e-2, "beta": 0.04, "steps_per_save": 2, "progress": False,
           **SMALL}
    procs = _start_ranks(tmp_path, "grpo", cfg)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    w0, w1 = _weights(tmp_path / "r0.safetensors"), _weights(tmp_path / "r1.safetensors")
    assert w0.keys() == w1.keys()
    for k in w0:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
    assert any(np.abs(w0[k]).max() > 0 for k in w0 if "lora_b" in k)  # it trained
    run0 = tmp_path / "rank0" / "run"
    assert (run0 / "adapters" / "adapters.safetensors").exists()
    rows = [json.loads(x) for x in (run0 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert not (tmp_path / "rank1" / "run").exists()  # rank 1 wrote nothing
    assert list((tmp_path / "rank1").iterdir()) == []


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_dead_or_hung_rank_stops_the_others_with_a_clear_error(tiny_model_dir, cc0_labels,
                                                                  tmp_path, how):
    cfg = {"model": str(tiny_model_dir), "data": str(cc0_labels), "out": "run", "iters": 500,
           "batch_size": 2, "group_size": 2, "max_completion_length": 4, "beta": 0.0,
           "steps_per_save": 1000, "progress": False, **SMALL}
    procs = _start_ranks(tmp_path, "grpo", cfg, {"QPONDER_DIST_TIMEOUT": "8"})
    metrics = tmp_path / "rank0" / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.time() < deadline and procs[0].poll() is None, "training did not start"
        time.sleep(0.2)
    t0 = time.time()
    os.kill(procs[1].pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    try:
        out, _ = procs[0].communicate(timeout=60)
    finally:
        if how == "hang":
            os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].communicate()
    assert procs[0].returncode != 0
    assert time.time() - t0 < 60
    # A dead peer may surface as the ring's error or, when a collective stays blocked, through
    # the watchdog; a hung peer only through the watchdog. Either way: one clear line, no hang.
    messages = ["no answer from the other ranks"]
    if how == "kill":
        messages.append("another rank stopped")
    assert any(m in out for m in messages), out[-2000:]

"""Both stages share one run loop (train/runner.py): a stop signal finishes the step, saves a
checkpoint and raises RunStopped; resuming gives the same adapter bytes as a run never stopped.
Plus the CLI's side: the stop line, the exit code, progress lines when stdout is a file, and a
fresh run refusing a folder that is not a run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from qponder_mlx.cli.main import app
from typer.testing import CliRunner

from qponder_mlx.grpo.config import GRPOConfig
from qponder_mlx.grpo.trainer import run_grpo
from qponder_mlx.testing.sft_sets import cc0_sft_rows, write_jsonl
from qponder_mlx.train.checkpoint import list_checkpoints
from qponder_mlx.train.config import SFTConfig
from qponder_mlx.train.runner import RunStopped
from qponder_mlx.train.sft import run_sft

SMALL = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
ITERS = 4


def _low_ids(ro, parsed, mos):  # a reward with signal even for a random model
    r = np.array([np.mean([t < 280 for t in c.token_ids]) for g in ro.completions for c in g])
    return r, {"low_ids": r}


def _sft(tmp_path, model, out):
    data = write_jsonl(tmp_path / "d.jsonl", cc0_sft_rows(4))
    cfg = SFTConfig(model=str(model), data=str(data), out=str(out), iters=ITERS, batch_size=2,
                    warmup=0, learning_rate=1e-3, steps_per_save=100, steps_per_report=1,
                    progress=False, **SMALL)
    return cfg, lambda **kw: run_sft(cfg, **kw)


def _grpo(tmp_path, model, labels, out):
    cfg = GRPOConfig(model=str(model), data=str(labels), out=str(out), iters=ITERS,
                     batch_size=2, group_size=2, max_completion_length=6, learning_rate=2e-2,
                     steps_per_save=100, progress=False, lr_schedule="constant", **SMALL)
    return cfg, lambda **kw: run_grpo(cfg, reward_fn=_low_ids, **kw)


def _adapter_bytes(run_dir):
    return (run_dir / "adapters" / "adapters.safetensors").read_bytes()


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_a_signal_stops_at_the_step_and_resume_gives_the_same_adapter_bytes(
        stage, tmp_path, tiny_model_dir, cc0_labels):
    def make(out):
        return (_sft(tmp_path, tiny_model_dir, out) if stage == "sft"
                else _grpo(tmp_path, tiny_model_dir, cc0_labels, out))

    _, straight = make(tmp_path / "straight")
    want = _adapter_bytes(straight())
    for signum, at in ((signal.SIGINT, 1), (signal.SIGTERM, 2)):
        _, run = make(tmp_path / f"stopped{signum}")

        def send(step, info, signum=signum, at=at):
            if step == at:
                os.kill(os.getpid(), signum)  # what Ctrl-C / `kill` / a scheduler send

        with pytest.raises(RunStopped) as stopped:
            run(on_step=send)
        assert (stopped.value.step, stopped.value.exit_code) == (at, 128 + signum)
        # step `at` finished and was checkpointed although the save cadence is 100
        assert [p.name for p in list_checkpoints(stopped.value.run_dir)] == [f"step_{at:07d}"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
        resumed = run(resume=True)
        assert _adapter_bytes(resumed) == want, (stage, signum)
        rows = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, ITERS + 1))
        problems = resumed / "data_problems.jsonl"
        assert not problems.exists() or problems.read_text() == ""


@pytest.mark.parametrize("stage, signum", [("sft", signal.SIGTERM), ("grpo", signal.SIGINT)])
def test_cli_prints_progress_to_a_file_and_stops_with_the_resume_line(
        stage, signum, tmp_path, tiny_model_dir, cc0_labels):
    """`qponder train ... > log`: stdout is a file, so plain progress lines appear during the
    run; a signal ends it at a step boundary with the stop line and exit 128 + signal, and the
    command it prints resumes the run."""
    data = (write_jsonl(tmp_path / "d.jsonl", cc0_sft_rows(4)) if stage == "sft"
            else cc0_labels)
    out = tmp_path / "run"
    log = tmp_path / "log.txt"
    argv = [sys.executable, "-m", "qponder_mlx.cli.main", "train", "--stage", stage,
            "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
            "--iters", "400", "--batch-size", "2", "--warmup", "0",
            "--min-pixels", str(SMALL["min_pixels"]), "--max-pixels", str(SMALL["max_pixels"])]
    if stage == "grpo":
        argv += ["--set", "group_size=2", "--set", "max_completion_length=4"]
    with log.open("w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        # the first progress line arrives after step 1 (its cadence: test_plain_progress_...)
        while time.monotonic() < deadline and f"{stage} " not in log.read_text():
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    text = log.read_text()
    assert proc.returncode == 128 + signum, err
    progress = [line for line in text.splitlines() if line.startswith(f"{stage} ")]
    assert len(progress) >= 1 and "/400 (" in progress[0]
    assert ("loss=" if stage == "sft" else "reward=") in progress[-1]
    stop = [line for line in text.splitlines() if line.startswith("stopped at step")]
    assert len(stop) == 1 and "checkpoint saved" in stop[0]
    step = int(stop[0].split()[3].rstrip(";"))
    assert [p.name for p in list_checkpoints(out)] == [f"step_{step:07d}"]
    resume = stop[0].split("resume with: ", 1)[1]
    assert resume == f"qponder train --stage {stage} --out {out} --resume"
    # the printed command continues the run (a short one: --iters on top of the saved config)
    res = CliRunner().invoke(app, resume.split()[1:] + ["--iters", str(step + 1)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == step


def test_a_fresh_run_refuses_a_folder_that_is_not_a_run(tmp_path, tiny_model_dir):
    model_copy = tmp_path / "model"
    model_copy.mkdir()
    (model_copy / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (model_copy / "model.safetensors").write_bytes(b"weights")
    data = write_jsonl(tmp_path / "d.jsonl", cc0_sft_rows(2))
    res = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--data", str(data),
                                   "--out", str(model_copy), "--iters", "1"])
    assert res.exit_code == 2
    assert "not empty and not a qponder run folder" in res.output
    assert "model.safetensors" in res.output
    assert (model_copy / "config.json").read_text() == '{"model_type": "qwen2_5_vl"}'


def test_plain_progress_prints_the_first_step_then_every_10_steps_or_30_s(monkeypatch):
    import io

    from qponder_mlx import progress as P

    now = [0.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    bar = P.PlainProgress(100, "sft", "step", every=10, out=out, completed=20)
    for step in range(21, 45):
        now[0] += 0.5
        bar.advance(1, loss=f"{step}")
    now[0] += 31  # a slow step: a line although only 3 steps passed since the last one
    bar.advance(1, loss="45")
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["21/100", "31/100", "41/100", "45/100"]
    assert lines[1] == "sft 31/100 (31%) 2.00 step/s ETA 34s elapsed 6s loss=31"


def test_plain_progress_heartbeat_repeats_the_status_during_a_long_item(monkeypatch):
    import io

    from qponder_mlx import progress as P

    now = [0.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    bar = P.PlainProgress(10, "grpo", "step", every=10, out=out)
    bar.advance(1, reward="0.5")
    now[0] += 20
    bar.heartbeat()                      # 20 s into a step: nothing yet
    now[0] += 15
    bar.heartbeat()                      # 35 s: the job says it is alive
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("grpo 1/10") and lines[1].endswith(
        "reward=0.5 (working)")

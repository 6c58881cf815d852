"""kill -9 at seeded random moments of the real CLIs (`score`, `distill`, `train --stage sft|grpo`),
then the same command again (`--resume` for train): nothing lost, nothing duplicated, outputs equal
to an uninterrupted run (score rows equal; training equal from the last checkpoint).

Each test runs 3 trials by default and 20 under `pytest -m slow`. The killed run is a real
subprocess (`qponder ...`); the uninterrupted reference and the rerun go through the same Typer
app in-process (same code, no second interpreter start). Set QPONDER_RELIABILITY_RESULTS=FILE to
append one JSON line per trial (docs/reliability.md quotes those numbers).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from distill_server import Reply, ScriptedServer, Status, answer, write_index_image
from qponder_mlx.cli.main import app
from reliability.procs import qponder_cmd, run_and_kill
from typer.testing import CliRunner

from qponder_mlx.io import read_jsonl
from qponder_mlx.testing.sft_sets import CC0_IMAGES, cc0_sft_rows, write_jsonl
from qponder_mlx.train.checkpoint import list_checkpoints

SMALL = ["--min-pixels", "3136", "--max-pixels", "12544"]
TRIALS = [pytest.param(3, id="3-trials"),
          pytest.param(20, id="20-trials", marks=pytest.mark.slow)]


def invoke(*args, env: dict | None = None):
    res = CliRunner().invoke(app, [str(a) for a in args], env=env)
    out = res.output  # stdout and stderr, interleaved (click 8.2+)
    assert res.exit_code == 0, out
    return out


def reference_span(run, progress) -> float:
    """Run the uninterrupted reference while a thread watches `progress()`; the seconds from its
    first rise to its last change: the window in which kills should land."""
    marks: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        last = 0
        while not stop.is_set():
            now = progress()
            if now != last:
                marks.append(time.monotonic())
                last = now
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run()
    finally:
        stop.set()
        watcher.join()
    return marks[-1] - marks[0] if len(marks) > 1 else 0.5


# Kills land up to this far past the reference's last write: the tail (exports, summary,
# closing files) must be safe too.
TAIL = 1.25


def record(command: str, trial: int, killed, **extra) -> None:
    path = os.environ.get("QPONDER_RELIABILITY_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"command": command, "trial": trial, **asdict(killed), **extra})
                    + "\n")


def lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for line in f if line.endswith(b"\n"))
    except FileNotFoundError:
        return 0


# --------------------------------------------------------------------------------------------
# score


def db_count(db: Path, sql: str = "SELECT COUNT(*) FROM results"):
    if not db.exists():
        return 0
    con = sqlite3.connect(db, timeout=10)
    try:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE name='results'").fetchone():
            return 0
        return con.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # created but not yet initialised
    finally:
        con.close()


def score_rows(path: Path) -> dict[str, dict]:
    rows = {}
    for r in read_jsonl(path):
        assert r["path"] not in rows, f"duplicate row for {r['path']}"
        rows[r["path"]] = {k: v for k, v in r.items() if k not in ("seconds", "scored_at")}
    return rows


@pytest.mark.parametrize("trials", TRIALS)
def test_score_kill9_then_rerun_equals_uninterrupted(trials, tiny_model_dir, tmp_path):
    lib = tmp_path / "photos"
    lib.mkdir()
    for p in sorted(CC0_IMAGES.iterdir())[:12]:
        shutil.copy(p, lib / p.name)
    (lib / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    n_files = 13
    args = ["score", lib, "--model", tiny_model_dir, "--mode", "reason", "--max-tokens", 12,
            "--batch-size", 2, *SMALL, "--no-progress"]

    span = reference_span(
        lambda: invoke(*args, "--db", tmp_path / "ref.sqlite", "--jsonl", tmp_path / "ref.jsonl"),
        lambda: db_count(tmp_path / "ref.sqlite"))
    ref = score_rows(tmp_path / "ref.jsonl")
    assert len(ref) == n_files

    for trial in range(trials):
        db = tmp_path / f"t{trial}.sqlite"
        killed = run_and_kill(qponder_cmd(*args, "--db", db), seed=100 + trial,
                              early=trial % 4 == 0, progress=lambda db=db: db_count(db),
                              span_s=TAIL * span,
                              log_path=tmp_path / f"t{trial}.log")
        # What was committed is whole and unique (one row per content and scorer).
        assert db_count(db, "PRAGMA integrity_check") in ("ok", 0)
        committed = db_count(db)
        assert db_count(db, "SELECT COUNT(*) - COUNT(DISTINCT sha256 || identity) "
                            "FROM results") == 0
        errors = db_count(db, "SELECT COUNT(*) FROM results WHERE error IS NOT NULL")

        out = invoke(*args, "--db", db, "--jsonl", tmp_path / f"t{trial}.jsonl")
        assert f"{committed - errors} cached (skipped)" in out, out  # nothing committed redone
        assert db_count(db) == n_files  # nothing lost, nothing twice
        assert score_rows(tmp_path / f"t{trial}.jsonl") == ref, f"trial {trial}: {killed}"
        record("score", trial, killed, committed_at_kill=committed, files=n_files)


# --------------------------------------------------------------------------------------------
# distill


def distill_tables(out: Path) -> tuple[dict, dict]:
    def table(path):
        rows = {}
        for r in read_jsonl(path):
            assert r["id"] not in rows, f"duplicate id {r['id']} in {path}"
            r.pop("latency_s", None)
            for a in r.get("attempt_details", []):
                a.pop("latency_s", None)
            rows[r["id"]] = r
        return rows

    kept, dropped = table(out), table(out.with_name(out.stem + ".rejected.jsonl"))
    assert not set(kept) & set(dropped)
    return kept, dropped


@pytest.mark.parametrize("trials", TRIALS)
def test_distill_kill9_then_rerun_equals_uninterrupted(trials, tmp_path):
    n = 18
    mos = [1.5 + (i % 7) * 0.5 for i in range(n)]
    data = tmp_path / "data"
    data.mkdir()
    with (data / "labels.jsonl").open("w") as f:
        for i, m in enumerate(mos):
            write_index_image(data / f"img_{i:02d}.png", i)
            f.write(json.dumps({"image": f"img_{i:02d}.png", "mos": m, "id": f"s{i:02d}"}) + "\n")
    # Stateless per sample (a re-asked sample gets the same reply): kept, rejected for score,
    # rejected for format, failed with HTTP 400.
    scripts = {i: [[Reply(answer(mos[i] + 0.2)), Reply(answer(min(5.0, mos[i] + 1.6))),
                    Reply("no tags here"), Status(400)][i % 4]] for i in range(n)}
    base = ["distill", "--data", data / "labels.jsonl", "--teacher-model", "t",
            "--concurrency", 3]

    with ScriptedServer(scripts, delay=0.1) as srv:
        ref_out = tmp_path / "ref" / "d.jsonl"
        span = reference_span(
            lambda: invoke(*base, "--teacher-url", srv.url, "--out", ref_out),
            lambda: lines(ref_out) + lines(ref_out.with_name("d.rejected.jsonl")))
        ref = distill_tables(ref_out)
        assert len(ref[0]) + len(ref[1]) == n

        for trial in range(trials):
            out = tmp_path / f"t{trial}" / "d.jsonl"
            rejected = out.with_name("d.rejected.jsonl")
            killed = run_and_kill(
                qponder_cmd(*base, "--teacher-url", srv.url, "--out", out),
                seed=200 + trial, early=trial % 4 == 0,
                progress=lambda o=out, r=rejected: lines(o) + lines(r), span_s=TAIL * span,
                log_path=tmp_path / f"t{trial}.log")
            kept_at_kill, dropped_at_kill = distill_tables(out)  # whole rows, unique ids
            done = set(kept_at_kill) | set(dropped_at_kill)
            resumed_at = time.monotonic()
            log = invoke(*base, "--teacher-url", srv.url, "--out", out)
            if done:
                assert f"resumed: {len(done)} of {n}" in log
            asked_again = {f"s{s.index:02d}" for s in srv.seen if s.t >= resumed_at}
            assert not asked_again & done, "finished samples were asked again"
            assert distill_tables(out) == ref, f"trial {trial}: {killed}"
            record("distill", trial, killed, written_at_kill=len(done), samples=n)


# --------------------------------------------------------------------------------------------
# train (SFT and GRPO)


def adapters(run: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in
            mx.load(str(run / "adapters" / "adapters.safetensors")).items()}


def metric_rows(run: Path, keys: tuple[str, ...]) -> list[tuple]:
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    return [(r["step"], *(round(r[k], 5) for k in keys)) for r in rows]


def last_checkpoint(run: Path) -> int:
    names = [p.name for p in list_checkpoints(run)]
    return int(names[-1].split("_")[1]) if names else 0


def train_trials(stage: str, args: list, trials: int, tmp_path: Path, keys: tuple[str, ...],
                 iters: int, seed0: int) -> None:
    ref_run = tmp_path / "ref"
    span = reference_span(lambda: invoke(*args, "--out", ref_run),
                          lambda: lines(ref_run / "metrics.jsonl"))
    ref_adapters, ref_metrics = adapters(ref_run), metric_rows(ref_run, keys)
    assert [m[0] for m in ref_metrics] == list(range(1, iters + 1))

    for trial in range(trials):
        run = tmp_path / f"t{trial}"
        killed = run_and_kill(qponder_cmd(*args, "--out", run), seed=seed0 + trial,
                              early=trial % 4 == 0,
                              progress=lambda r=run: lines(r / "metrics.jsonl"),
                              span_s=TAIL * span,
                              log_path=tmp_path / f"t{trial}.log")
        resume_from = last_checkpoint(run)
        invoke(*args, "--out", run, "--resume")
        summary = json.loads((run / "summary.json").read_text())
        assert summary["resumed_from"] == resume_from, (summary, killed)  # the last checkpoint
        got = adapters(run)
        assert got.keys() == ref_adapters.keys()
        for k in got:
            np.testing.assert_allclose(got[k], ref_adapters[k], atol=1e-5,
                                       err_msg=f"trial {trial} {killed}: {k}")
        # Every step logged exactly once, with the uninterrupted run's numbers.
        assert metric_rows(run, keys) == ref_metrics, f"trial {trial}: {killed}"
        record(stage, trial, killed, resumed_from=resume_from, iters=iters)


@pytest.mark.parametrize("trials", TRIALS)
def test_sft_kill9_then_resume_equals_uninterrupted(trials, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", cc0_sft_rows(4))
    iters = 6
    # Dropout, warmup + cosine and an epoch boundary: RNG, schedule and data cursor all matter.
    args = ["train", "--stage", "sft", "--model", tiny_model_dir, "--data", data,
            "--iters", iters, "--batch-size", 2, "--learning-rate", "1e-3", "--warmup", 1,
            *SMALL, "--set", "steps_per_save=2", "--set", "steps_per_report=1",
            "--set", "lora.dropout=0.1", "--no-progress"]
    train_trials("sft", args, trials, tmp_path, ("loss", "learning_rate"), iters, 300)


@pytest.mark.parametrize("trials", TRIALS)
def test_grpo_kill9_then_resume_equals_uninterrupted(trials, tiny_model_dir, cc0_labels,
                                                     tmp_path):
    iters = 3
    # The random tiny model never answers in format, so every reward is 0; AdamW's decoupled
    # weight decay still moves the adapters each step, so a step done twice or skipped shows.
    # neg_logp per step checks that the resumed run samples the same completions.
    args = ["train", "--stage", "grpo", "--model", tiny_model_dir, "--data", cc0_labels,
            "--iters", iters, "--batch-size", 2, "--learning-rate", "1e-2", *SMALL,
            "--set", "group_size=3", "--set", "max_completion_length=6",
            "--set", "steps_per_save=1", "--set", "weight_decay=0.5", "--no-progress"]
    train_trials("grpo", args, trials, tmp_path, ("neg_logp", "completion_length"), iters, 400)


def test_resume_from_the_final_checkpoint_refreshes_the_run_adapters(tiny_model_dir, tmp_path):
    """A kill after the last checkpoint was written but before run/adapters was refreshed (a
    kill -9 trial met it) leaves run/adapters one checkpoint behind; the resume runs no step, so
    it must rewrite them from the checkpoint it restored."""
    data = write_jsonl(tmp_path / "train.jsonl", cc0_sft_rows(4))
    run = tmp_path / "run"
    args = ["train", "--stage", "sft", "--model", tiny_model_dir, "--data", data, "--iters", 4,
            "--batch-size", 2, "--learning-rate", "1e-3", "--warmup", 1, *SMALL,
            "--set", "steps_per_save=2", "--set", "keep_checkpoints=2", "--no-progress",
            "--out", run]
    invoke(*args)
    final = adapters(run)
    step2, step4 = list_checkpoints(run)
    # the state such a kill leaves: checkpoint 4 complete, run/adapters still step 2's
    shutil.copy(step2 / "adapters.safetensors", run / "adapters" / "adapters.safetensors")
    assert any(not np.array_equal(a, final[k]) for k, a in adapters(run).items())
    invoke(*args, "--resume")
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == 4
    for k, a in adapters(run).items():
        np.testing.assert_array_equal(a, final[k], err_msg=k)

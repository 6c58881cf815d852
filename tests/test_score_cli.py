"""`qponder score` end to end: flags, exports, resume, Ctrl-C and kill -9 (real subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from qponder_mlx.cli.cmd_score import register
from typer.testing import CliRunner

ASSETS = Path(__file__).resolve().parents[1] / "qponder_mlx" / "assets" / "cc0_mini" / "images"
SMALL = ["--min-pixels", str(56 * 56), "--max-pixels", str(112 * 112)]

# The command on its own Typer app: these tests exercise `score` whatever state the other
# commands are in. A callback keeps `score` a sub-command, as in the real `qponder` app.
RUNNER = ("import typer\nfrom qponder_mlx.cli.cmd_score import register\n"
          "app = typer.Typer()\napp.callback()(lambda: None)\nregister(app)\n"
          "app(prog_name='qponder')\n")


@pytest.fixture(scope="module")
def app():
    a = typer.Typer()
    a.callback()(lambda: None)
    register(a)
    return a


N_SMALL = 17  # 16 photos + 1 broken file


@pytest.fixture
def small_lib(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for p in sorted(ASSETS.iterdir())[:N_SMALL - 1]:
        shutil.copy(p, root / p.name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def invoke(app, *args):
    return CliRunner().invoke(app, ["score", *map(str, args)], catch_exceptions=False)


def count(db, sql="SELECT COUNT(*) FROM results"):
    con = sqlite3.connect(db)
    try:
        if "results" in sql and not con.execute(
                "SELECT 1 FROM sqlite_master WHERE name='results'").fetchone():
            return 0  # killed before the schema was created: an empty store
        return con.execute(sql).fetchone()[0]
    finally:
        con.close()


def test_the_real_cli_registers_score():
    from qponder_mlx.cli.main import app as real_app

    names = {c.name for c in real_app.registered_commands}
    assert "score" in names


def test_score_exports_and_rerun(app, small_lib, tmp_path, tiny_model_dir):
    db, out_csv, out_jsonl, report = (tmp_path / n for n in
                                      ("r.sqlite", "o.csv", "o.jsonl", "r.html"))
    args = [small_lib, "--model", tiny_model_dir, "--mode", "fast", "--batch-size", 8, "--db", db,
            *SMALL]
    res = invoke(app, *args, "--csv", out_csv, "--jsonl", out_jsonl, "--report", report)
    assert res.exit_code == 0, res.output
    assert "17 files: 16 scored, 0 cached (skipped), 1 errors" in res.output
    assert "errors: truncated or corrupt 1" in res.output
    rows = [json.loads(x) for x in out_jsonl.read_text().splitlines()]
    assert len(rows) == 17 and len(out_csv.read_text().splitlines()) == 18
    assert {r["path"] for r in rows} == {str(p) for p in small_lib.iterdir()}
    html = report.read_text()
    assert html.count('class="card"') == 16 and "broken.jpg" in html
    umask = os.umask(0)
    os.umask(umask)
    for f in (out_csv, out_jsonl, report):  # shareable files, not the 0600 of a temp file
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask

    res = invoke(app, *args)
    assert res.exit_code == 0
    assert "17 files: 0 scored, 16 cached (skipped), 1 errors" in res.output
    assert count(db) == 17


@pytest.mark.parametrize("extra, message", [
    (["--bundle", "b", "--model", "m"], "pass --bundle or --model/--adapter"),
    (["--mode", "slow"], "--mode 'slow': expected reason or fast"),
    (["--readout", "mean"], "--readout 'mean': expected text or expected"),
    (["--mode", "fast", "--readout", "expected"], "--readout expected is for --mode reason"),
    (["--min-pixels", "9000", "--max-pixels", "100"], "--min-pixels/--max-pixels"),
])
def test_bad_flags_fail_in_one_line(app, small_lib, extra, message):
    res = invoke(app, small_lib, *extra)
    assert res.exit_code == 2
    assert message in res.output and res.output.count("error:") == 1


def test_no_images_and_bad_db_fail_in_one_line(app, tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    res = invoke(app, tmp_path / "empty", "--model", tiny_model_dir)
    assert res.exit_code == 2 and "no image files found" in res.output
    notdb = tmp_path / "notes.sqlite"
    notdb.write_text("hello\n" * 500)
    shutil.copy(ASSETS / "coffee_blur_1.png", tmp_path / "a.png")
    res = invoke(app, tmp_path / "a.png", "--model", tiny_model_dir, "--db", notdb)
    assert res.exit_code == 2 and "not a qponder results database" in res.output


# ----------------------------------------------------------------- real processes and signals


def start(args, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", RUNNER, "score", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)


def wait_for_rows(proc, db, at_least, timeout=90.0):
    """Poll the store (readable while the job writes: WAL) until it holds `at_least` rows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"job ended early ({proc.returncode}): {proc.communicate()}")
        if db.exists():
            try:
                if count(db) >= at_least:
                    return
            except sqlite3.OperationalError:
                pass  # schema not created yet
        time.sleep(0.02)
    pytest.fail("job made no progress")


def slow_args(lib, db, model):
    # Reason mode with a token budget, two images a batch: 8 batches to interrupt.
    return [lib, "--model", model, "--mode", "reason", "--max-tokens", 32, "--batch-size", 2,
            "--db", db, *SMALL]


def assert_consistent(db, n_files):
    assert count(db, "PRAGMA integrity_check") == "ok"
    assert count(db, "SELECT COUNT(*) - COUNT(DISTINCT sha256 || identity) FROM results") == 0
    assert count(db, "SELECT COUNT(*) FROM (SELECT path FROM results GROUP BY path "
                     "HAVING COUNT(*) > 1)") == 0
    assert count(db) <= n_files


def test_ctrl_c_stops_after_the_batch_and_rerun_resumes(small_lib, tmp_path, tiny_model_dir):
    db = tmp_path / "r.sqlite"
    proc = start(slow_args(small_lib, db, tiny_model_dir), tmp_path)
    wait_for_rows(proc, db, 3)
    before = count(db)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "interrupted: stopped after the current batch" in err and "Traceback" not in err
    assert "Run the same command again to resume" in err
    saved = count(db)
    errors = count(db, "SELECT COUNT(*) FROM results WHERE error IS NOT NULL")
    # The batch in flight is finished and committed, and nothing after it is started.
    assert before <= saved <= before + 4 and saved < N_SMALL
    assert_consistent(db, N_SMALL)
    assert f"{N_SMALL - saved} not reached" in out

    proc = start(slow_args(small_lib, db, tiny_model_dir), tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    # The broken file's error row is cached too: it counts as an error, not as "cached".
    assert f"{saved - errors} cached (skipped)" in out and "1 errors" in out
    assert count(db) == N_SMALL


def test_kill_9_at_any_point_loses_and_duplicates_nothing(small_lib, tmp_path, tiny_model_dir):
    db = tmp_path / "r.sqlite"
    seen = []
    for at_least in (0, 5):  # as soon as the store exists; then mid-run
        proc = start(slow_args(small_lib, db, tiny_model_dir), tmp_path)
        if at_least == 0:
            while not db.exists() and proc.poll() is None:
                time.sleep(0.01)
        else:
            wait_for_rows(proc, db, at_least)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert_consistent(db, N_SMALL)
        seen.append(count(db))
    assert seen == sorted(seen) and seen[-1] >= 5  # committed work is never lost

    errors = count(db, "SELECT COUNT(*) FROM results WHERE error IS NOT NULL")
    proc = start(slow_args(small_lib, db, tiny_model_dir), tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"{seen[-1] - errors} cached (skipped)" in out  # nothing committed was redone
    assert count(db) == N_SMALL
    assert_consistent(db, N_SMALL)
    paths = {r for (r,) in sqlite3.connect(db).execute("SELECT path FROM results")}
    assert paths == {str(p) for p in small_lib.iterdir()}

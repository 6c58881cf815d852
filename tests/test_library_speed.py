"""The library job at the model's pace: reads run ahead of the model in threads (bounded, same
results and order as reading in turn), and the fast-first workflow (`--explain`)."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from qponder_mlx.cli.cmd_score import register
from typer.testing import CliRunner

from qponder_mlx.library import ResultStore, StopFlag, score_job, score_library
from qponder_mlx.library.fast_first import (
    ExplainSpec,
    explain_library,
    parse_explain,
    pick_for_explain,
    reason_scorer,
    with_explanations,
)
from qponder_mlx.library.report import render_report
from qponder_mlx.scoring import ScoreConfig, Scorer

ASSETS = Path(__file__).resolve().parents[1] / "qponder_mlx" / "assets" / "cc0_mini" / "images"
SMALL = ["--min-pixels", str(56 * 56), "--max-pixels", str(112 * 112)]


def photo(path: Path, seed: int, size=(112, 84)) -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def fast(tiny_loaded, small_pixels):
    return Scorer(tiny_loaded, ScoreConfig(mode="fast", batch_size=3, pixels=small_pixels))


@pytest.fixture
def lib(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    sizes = [(112, 84), (84, 112), (96, 96)]
    files = [photo(root / f"p{i:02d}.png", i, sizes[i % 3]) for i in range(10)]
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "copy.png").write_bytes(files[4].read_bytes())
    return sorted(root.iterdir())


# ---------------------------------------------------------------------------- reading ahead


def test_read_ahead_keeps_order_and_stays_bounded(monkeypatch, small_pixels):
    started: list[str] = []
    lock = threading.Lock()

    def fake_read(path, policy):
        with lock:
            started.append(path)
        return score_job._Read(error=path)

    monkeypatch.setattr(score_job, "_read_for_scoring", fake_read)
    batches = [[f"{b}-{i}" for i in range(4)] for b in range(20)]
    with score_job.read_ahead(batches, small_pixels, workers=3, ahead=2) as reads:
        for n, (batch, got) in enumerate(zip(batches, reads)):
            assert [r.error for r in got] == batch  # each batch's reads, in order
            time.sleep(0.005)  # the "model": workers may run ahead meanwhile
            with lock:
                # Never more than this batch and 2 more were handed to the workers.
                assert len(started) <= 4 * (n + 3)
            if n == 5:
                break  # a stop: leaving the block cancels what has not started
    time.sleep(0.05)
    assert len(started) <= 4 * 8  # nothing was read after the stop, beyond the queued batches


def test_threads_give_the_same_store_as_reading_in_turn(fast, lib, tmp_path):
    dumps = []
    for workers in (0, 3):
        with ResultStore(tmp_path / f"w{workers}.sqlite") as store:
            s = score_library(fast, lib, store, progress=False, decode_workers=workers)
            dumps.append(((s.scored, s.cached, dict(s.errors)), store.db.execute(
                "SELECT sha256, path, score, error, error_kind FROM results "
                "ORDER BY rowid").fetchall()))
    assert dumps[0] == dumps[1]  # same rows, written in the same order
    # 10 photos + a copy (scored once, counted per path) and the broken file.
    assert dumps[0][0] == (11, 0, {"truncated or corrupt": 1})
    assert len(dumps[0][1]) == 11  # one row per content


def test_a_stop_with_reads_in_flight_resumes_exactly(fast, lib, tmp_path):
    stop = StopFlag()
    calls = []
    real = fast.score

    class StopAfterOne:
        def __getattr__(self, name):
            return getattr(fast, name)

        def score(self, items):
            calls.append(len(items))
            stop.set()  # after the first batch: the next ones are being read meanwhile
            return real(items)

    with ResultStore(tmp_path / "s.sqlite") as store:
        first = score_library(StopAfterOne(), lib, store, stop=stop, progress=False)
        assert first.interrupted and len(calls) == 1 and first.pending > 0
        rest = score_library(fast, lib, store, progress=False)
        # What the first run committed is cached (its error row too, counted as an error).
        assert rest.cached == first.scored and rest.n_errors == 1
        assert rest.scored + rest.cached + rest.n_errors == len(lib) and not rest.pending


# ---------------------------------------------------------------------------- fast first


@pytest.mark.parametrize("spec, want", [
    ("worst:50,best:20", ExplainSpec(50, 20)), ("best:3", ExplainSpec(0, 3)),
    (" BEST:1 , worst:0 ", ExplainSpec(0, 1)),
])
def test_parse_explain(spec, want):
    assert parse_explain(spec) == want


@pytest.mark.parametrize("spec", ["worst", "worst:x", "middle:3", "worst:1,worst:2", "worst:0",
                                  "worst:-1", ""])
def test_parse_explain_refuses_in_one_line(spec):
    with pytest.raises(ValueError, match="--explain") as e:
        parse_explain(spec)
    assert "\n" not in str(e.value)


def row(path, score, sha=None, error=None):
    return {"path": path, "score": score, "sha256": sha or path, "error": error}


def test_pick_worst_and_best_by_score_then_path():
    rows = [row("a", 3.0), row("b", 1.5), row("c", 4.5), row("d", 1.5), row("e", None),
            row("f", None, error="not an image"), row("g", 4.5, sha="c"), row("h", 2.0)]
    # worst 2: b and d (1.5, by path); best 1: c (g is a copy of c). None/errors never picked.
    assert pick_for_explain(rows, ExplainSpec(worst=2, best=1)) == ["b", "c", "d"]
    # More asked than there are: every scored content once.
    assert pick_for_explain(rows, ExplainSpec(worst=9, best=9)) == ["a", "b", "c", "d", "h"]


def test_explain_keeps_both_results_and_the_report_shows_them(fast, lib, tmp_path):
    reason = reason_scorer(fast, sampling=fast.config.sampling.__class__(max_tokens=6))
    with ResultStore(tmp_path / "s.sqlite") as store:
        score_library(fast, lib, store, progress=False)
        _, picked, summary = explain_library(fast, lib, store, ExplainSpec(worst=2, best=1),
                                             reason=reason, progress=False)
        fast_rows = store.rows(fast.identity, map(str, lib))
        scored = sorted((r for r in fast_rows if r["score"] is not None),
                        key=lambda r: (r["score"], r["path"]))
        assert picked == sorted({scored[0]["path"], scored[1]["path"], scored[-1]["path"]})
        assert summary.scored + summary.no_score == 3
        explained = store.rows(reason.identity, picked)
        assert {r["mode"] for r in explained} == {"reason"} and len(explained) == 3
        assert store.result_count(fast.identity) == 11  # the fast rows are all still there
        page = render_report(with_explanations(fast_rows, explained), {})
        # Every card of an explained content shows it (a copy of a picked photo too).
        n = sum(r["sha256"] in {x["sha256"] for x in explained} for r in fast_rows)
        assert page.count('class="explained"') == n >= 3
        assert f"{n} explained in reason mode" in page
        # A rerun redoes nothing: both passes are cached.
        again = explain_library(fast, lib, store, ExplainSpec(worst=2, best=1), reason=reason,
                                progress=False)[2]
        assert (again.scored, again.cached) == (0, 3)


def test_cli_explain_end_to_end(tmp_path, tiny_model_dir):
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(ASSETS.iterdir())[:6]:
        shutil.copy(p, photos / p.name)
    db, report = tmp_path / "r.sqlite", tmp_path / "r.html"
    args = ["score", str(photos), "--model", str(tiny_model_dir), "--db", str(db), *SMALL,
            "--mode", "fast", "--explain", "worst:1,best:1", "--max-tokens", "4",
            "--report", str(report), "--no-progress"]
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "explain: 2 photos picked by fast score" in r.output
    con = sqlite3.connect(db)
    modes = dict(con.execute("SELECT mode, COUNT(*) FROM results GROUP BY mode").fetchall())
    con.close()
    assert modes == {"fast": 6, "reason": 2}
    assert report.read_text().count('class="explained"') == 2
    bad = CliRunner().invoke(app, [*args[:-9], "--explain", "best:2"], catch_exceptions=False)
    assert bad.exit_code == 2 and "add --mode fast" in bad.output

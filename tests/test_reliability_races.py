"""Files that change under a running job, files that are not files, names that are not safe to
print, and label files far longer than `--limit` asks for."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from qponder_mlx.cli.main import app
from typer.testing import CliRunner

from qponder_mlx import labels as labels_mod
from qponder_mlx.io import file_sha256
from qponder_mlx.library import ResultStore, discover, score_job, score_library
from qponder_mlx.library.store import UNREADABLE_PREFIX
from qponder_mlx.safe_paths import redact_url, shown
from qponder_mlx.scoring import ScoreConfig, Scorer

SMALL = ["--min-pixels", "3136", "--max-pixels", "12544"]


def photo(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def within(seconds: float, fn, *args):
    """fn(*args) in a thread; fails (instead of hanging the suite) if it takes longer."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 — handed back to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn.__name__} still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture(scope="module")
def fast(tiny_loaded, small_pixels):
    return Scorer(tiny_loaded, ScoreConfig(mode="fast", batch_size=4, pixels=small_pixels))


# --------------------------------------------------------------------------------------------
# 5. the bytes hashed are the bytes decoded


def test_a_file_changed_or_removed_after_hashing_is_never_stored_under_its_old_hash(
        fast, tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    a, b, c = (photo(lib / f"{n}.png", i) for i, n in enumerate("abc"))
    old_a, old_b = sha(a.read_bytes()), sha(b.read_bytes())
    b_bytes = b.read_bytes()
    new_a = photo(tmp_path / "new_a.png", 99).read_bytes()
    real = score_job._hash_files

    def hash_then_change(*args):
        out = real(*args)
        a.write_bytes(new_a)  # rewritten between hashing and scoring
        b.unlink()  # removed between hashing and scoring
        return out

    monkeypatch.setattr(score_job, "_hash_files", hash_then_change)
    with ResultStore(tmp_path / "s.sqlite") as store:
        summary = score_library(fast, [a, b, c], store, progress=False)
        keys = {r[0]: dict(r) for r in store.db.execute(
            "SELECT sha256, error, error_kind, score FROM results")}
        files = dict(store.db.execute("SELECT path, sha256 FROM files").fetchall())
    assert (summary.scored, dict(summary.errors)) == (2, {"file vanished": 1})
    assert old_a not in keys and old_b not in keys  # nothing stored under stale hashes
    assert keys[sha(new_a)]["score"] is not None and files[str(a)] == sha(new_a)
    gone = keys[UNREADABLE_PREFIX + str(b)]
    assert gone["error_kind"] == "read" and gone["error"].startswith("no such file")
    # The same score as scoring the new content directly.
    (tmp_path / "check.png").write_bytes(new_a)
    assert keys[sha(new_a)]["score"] == pytest.approx(
        fast.score([tmp_path / "check.png"])[0].score, abs=2e-4)

    # The file comes back: it is retried (docs/score.md) and scored under its own hash.
    monkeypatch.undo()
    b.write_bytes(b_bytes)
    with ResultStore(tmp_path / "s.sqlite") as store:
        summary = score_library(fast, [a, b, c], store, progress=False)
        assert (summary.scored, summary.cached, summary.n_errors) == (1, 2, 0)
        assert store.db.execute("SELECT score FROM results WHERE sha256=?",
                                (old_b,)).fetchone()[0] is not None


# --------------------------------------------------------------------------------------------
# 11. FIFOs and device links are refused, never read


def test_a_fifo_or_a_device_link_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    folder = tmp_path / "album"
    folder.mkdir()
    os.symlink("/dev/zero", folder / "zero.jpg")
    os.symlink(tmp_path / "gone.jpg", folder / "dangling.jpg")
    found = within(5, discover, [fifo, folder, folder / "zero.jpg"])
    assert found.files == []
    assert found.problems == [
        f"{fifo}: not a regular file (FIFO) — only image files are read; remove it from the "
        "arguments",
        f"{folder / 'zero.jpg'}: not a regular file (character device) — only image files are "
        "read; remove it from the arguments",
        f"{folder / 'zero.jpg'}: not a regular file (character device) — only image files are "
        "read; remove it from the arguments",
    ]
    # A dangling link is not refused: it is an error row of `qponder score`.
    assert found.errors == [(str(folder / "dangling.jpg"),
                             "broken link (its target is gone) — fix or remove the link")]
    for special in (fifo, folder / "zero.jpg"):
        with pytest.raises(OSError, match="not a regular file"):
            within(5, file_sha256, special)


def test_score_with_a_fifo_argument_finishes(tmp_path, tiny_model_dir):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    good = photo(tmp_path / "good.png", 1)
    res = within(60, CliRunner().invoke, app, [
        "score", str(fifo), str(good), "--db", str(tmp_path / "s.sqlite"), "--model",
        str(tiny_model_dir), "--mode", "fast", *SMALL, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "skipped: " + str(fifo) + ": not a regular file (FIFO)" in res.output
    assert "1 files: 1 scored" in res.output


# --------------------------------------------------------------------------------------------
# 13. names are escaped; 14. URLs redacted (unit level)


def test_shown_escapes_controls_and_keeps_the_rest():
    assert shown("a\x1b]0;pwned\x07b\nc\u2028d\u202ee\udce9 é 日本") == \
        "a\\x1b]0;pwned\\x07b\\x0ac\\u2028d\\u202ee\\udce9 é 日本"
    assert redact_url("http://bob:pw@host:8000/v1") == "http://***@host:8000/v1"
    assert redact_url("https://host/v1") == "https://host/v1"


def test_file_names_with_escape_sequences_cannot_drive_the_terminal(tmp_path, tiny_model_dir):
    folder = tmp_path / "g"
    folder.mkdir()
    for name in ("\x1b]0;pwned\x07.jpg", "evil\nerror: forged line.jpg", "\x9b31m.jpg"):
        os.symlink(tmp_path / "nowhere", folder / name)  # broken links: an error row each
    csv_out = tmp_path / "s.csv"
    res = CliRunner().invoke(app, ["score", str(folder), "--db", str(tmp_path / "s.sqlite"),
                                   "--model", str(tiny_model_dir), "--csv", str(csv_out)])
    out = res.output
    assert res.exit_code == 1  # nothing could be scored
    assert not any(c in out for c in "\x1b\x07\x9b"), repr(out)
    lines = out.splitlines()
    assert "errors: broken link 3" in lines
    assert [ln for ln in lines if ln.startswith("error:")] == [
        "error: none of the 3 files could be scored (reasons above)"]
    # The stored names are escaped too: a spreadsheet or `cat` of the export stays harmless.
    table = csv_out.read_text()
    assert not any(c in table for c in "\x1b\x07\x9b") and "evil\\x0aerror: forged line.jpg" \
        in table
    # Label rows naming such a file: the eval `skipped:` line is escaped too.
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"image": "x\x1b[2J.png", "mos": 3}) + "\n")
    res = CliRunner().invoke(app, ["eval", "--data", str(labels), "--model", str(tiny_model_dir)])
    assert res.exit_code == 2 and "\x1b" not in res.output and "x\\x1b[2J.png" in res.output


# --------------------------------------------------------------------------------------------
# 16. --limit stops reading early


def test_limit_reads_only_what_it_needs_of_a_100k_row_file(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "labels.jsonl"
    bad = "".join(json.dumps({"image": "missing.png", "mos": 3, "id": f"m{i}"}) + "\n"
                  for i in range(100))
    good = "".join(json.dumps({"image": "a.png", "mos": 3, "id": f"s{i}"}) + "\n"
                   for i in range(100_000))
    path.write_text(bad + good)
    headers, records = [], []
    real_problem, real_record = labels_mod._image_problem, labels_mod._json_record
    monkeypatch.setattr(labels_mod, "_image_problem",
                        lambda image: headers.append(image) or real_problem(image))
    monkeypatch.setattr(labels_mod, "_json_record",
                        lambda *a: records.append(a[1]) or real_record(*a))
    t0 = time.perf_counter()
    from qponder_mlx.cli.common import read_samples

    samples, problems = read_samples(path, limit=3)
    took = time.perf_counter() - t0
    assert [s.id for s in samples] == ["s0", "s1", "s2"]
    assert len(problems) == 100  # the rows it did read, each reported once
    # 100 missing + 3 good images checked; the lines parsed: re-reads of 64, 256 (x4 each
    # time) — a few hundred of the 100,100, not all of them.
    assert len(headers) <= 3 * 103 and len(records) <= 64 + 256
    assert took < 2.0

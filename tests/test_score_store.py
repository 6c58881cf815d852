"""The results store and the library job: resume, moves, duplicates, bad files, exports."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3

import numpy as np
import pytest
from fixtures_labels import png_with_header
from PIL import Image

from qponder_mlx import io as io_mod
from qponder_mlx.library import ResultStore, StopFlag, StoreError, score_library, write_csv
from qponder_mlx.library.score_job import error_reason, model_size, plan_batches
from qponder_mlx.library.tables import write_jsonl
from qponder_mlx.prompts import PROMPT_VERSION
from qponder_mlx.scoring import ScoreConfig, Scorer

# Sizes that the small pixel policy maps to different model sizes: batches must not mix them.
SIZES = [(112, 84), (84, 112), (96, 96)]


def photo(path, seed, size=(112, 84)):
    """A distinct image per seed (noise over a colour gradient), saved in the suffix's format."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255 * (seed % 5) / 4, w)[None, :, None] * np.ones((h, 1, 3))
    arr = np.clip(base + rng.normal(0, 20 + 15 * (seed % 7), (h, w, 3)), 0, 255).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def library(root, n=10):
    return [photo(root / f"p{i:02d}.png", i, SIZES[i % 3]) for i in range(n)]


class Counting:
    """Wraps a Scorer and counts the images it was asked to score (to prove skips)."""

    def __init__(self, scorer):
        self.inner, self.calls = scorer, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, items):
        items = list(items)
        # score_library passes decoded images that carry their file's path in `info`.
        self.calls.append([os.path.basename(str(getattr(i, "info", {}).get("path", i)))
                           for i in items])
        return self.inner.score(items)

    @property
    def n(self):
        return sum(len(c) for c in self.calls)


@pytest.fixture(scope="module")
def fast(tiny_loaded, small_pixels):
    return Scorer(tiny_loaded, ScoreConfig(mode="fast", batch_size=4, pixels=small_pixels))


@pytest.fixture
def store(tmp_path):
    with ResultStore(tmp_path / "db" / "results.sqlite") as s:
        yield s


def run(scorer, files, store, **kw):
    return score_library(scorer, files, store, progress=False, **kw)


def by_path(store, identity):
    return {r["path"]: r for r in store.rows(identity)}


# ----------------------------------------------------------------------------- the store itself


def test_store_uses_wal_and_rolls_back_a_failed_transaction(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    row = {"sha256": "a" * 64, "identity": "m:fast:v1", "path": "/x.jpg", "score": 3.0,
           "format_ok": 1, "mode": "fast", "model": "m", "weights": "w",
           "prompt_version": "v1", "scored_at": 0.0}
    with pytest.raises(RuntimeError), store.transaction():
        store.put_results([row])
        raise RuntimeError("crash mid-batch")
    assert store.result_count() == 0
    with store.transaction():
        store.put_results([row, row])  # same key twice: one row, never a duplicate
    assert store.result_count() == 1


def test_a_file_that_is_not_a_database_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "results.sqlite"
    bad.write_text("path,score\n/x.jpg,3\n" * 100)
    with pytest.raises(StoreError) as exc:
        ResultStore(bad)
    assert str(exc.value).startswith(f"{bad}: not a qponder results database")
    assert "\n" not in str(exc.value)


def test_error_reasons_are_short_and_countable():
    assert error_reason("/a b.jpg: empty file (0 bytes) — re-export or remove it") == "empty file"
    assert error_reason("/x.jpg: truncated or corrupt image (image file is truncated) — "
                        "re-export") == "truncated or corrupt"
    assert error_reason("/x.png: 9000x9000 = 81,000,000 pixels exceeds the 80,000,000-pixel "
                        "limit (possible decompression bomb) — downscale it") == (
        "too many pixels (decompression bomb)")
    assert error_reason("model failed: RuntimeError: boom") == "model failed"
    assert error_reason("/x.jpg: weird thing (details 12) — hint") == "weird thing"


# ----------------------------------------------------------------------------- the job


def test_scores_match_the_scorer_and_batches_never_mix_sizes(fast, store, tmp_path):
    files = library(tmp_path / "lib", 9)
    counting = Counting(fast)
    summary = run(counting, files, store)
    assert (summary.scored, summary.cached, summary.n_errors) == (9, 0, 0)
    for batch in counting.calls:  # one model size per batch: no padding, one model call
        assert len({model_size(str(files[0].parent / n), fast.config.pixels)
                    for n in batch}) == 1
    rows = by_path(store, fast.identity)
    assert sorted(rows) == sorted(map(str, files))
    # Independent reference: each image scored alone, outside the library code.
    ref = {str(p): fast.score([p])[0].score for p in files}
    for p, r in rows.items():
        assert r["score"] == pytest.approx(ref[p], abs=2e-4)
        assert r["identity"] == fast.identity and r["mode"] == "fast"
        assert r["weights"] == fast.loaded.identity and r["prompt_version"] == PROMPT_VERSION
        assert r["seconds"] > 0
    # The reference must tell images apart, or a mixed-up mapping could pass.
    assert len({round(v, 3) for v in ref.values()}) >= 7


def test_plan_batches_groups_by_model_size_in_stable_order(small_pixels, tmp_path):
    files = [str(p) for p in library(tmp_path, 11)]
    batches = plan_batches(files, small_pixels, 2)
    assert sorted(p for b in batches for p in b) == sorted(files)
    assert [b[0] for b in batches] == sorted((b[0] for b in batches), key=files.index)
    for b in batches:
        assert len(b) <= 2 and len({model_size(p, small_pixels) for p in b}) == 1
        assert b == sorted(b, key=files.index)


def test_rerun_skips_everything_already_scored(fast, store, tmp_path):
    files = library(tmp_path / "lib", 6)
    run(fast, files, store)
    before = by_path(store, fast.identity)
    counting = Counting(fast)
    summary = run(counting, files, store)
    assert counting.n == 0
    assert (summary.scored, summary.cached, summary.files) == (0, 6, 6)
    assert by_path(store, fast.identity) == before


def test_rerun_reads_no_unchanged_file(fast, store, tmp_path, monkeypatch):
    files = library(tmp_path / "lib", 3)
    run(fast, files, store)

    def no_hashing(path, *a, **k):
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(io_mod, "file_sha256", no_hashing)
    monkeypatch.setattr("qponder_mlx.library.score_job.file_sha256", no_hashing)
    assert run(fast, files, store).cached == 3


def test_moved_and_renamed_file_keeps_its_score_without_rescoring(fast, store, tmp_path):
    files = library(tmp_path / "lib", 5)
    run(fast, files, store)
    old = by_path(store, fast.identity)[str(files[2])]
    new = tmp_path / "lib" / "2024" / "renamed.png"
    new.parent.mkdir()
    files[2].rename(new)
    files[2] = new
    counting = Counting(fast)
    summary = run(counting, files, store)
    assert counting.n == 0 and summary.moved == 1 and summary.cached == 5
    rows = by_path(store, fast.identity)
    assert str(new) in rows and str(tmp_path / "lib" / "p02.png") not in rows
    assert rows[str(new)]["score"] == old["score"]
    assert store.result_count(fast.identity) == 5
    stored_path = store.db.execute("SELECT path FROM results WHERE sha256=?",
                                   (old["sha256"],)).fetchone()[0]
    assert stored_path == str(new)


def test_edited_file_is_rescored_and_copies_are_scored_once(fast, store, tmp_path):
    files = library(tmp_path / "lib", 4)
    run(fast, files, store)
    photo(files[1], seed=99, size=SIZES[1])  # same path, new content
    copy = tmp_path / "lib" / "copy_of_p03.png"
    copy.write_bytes(files[3].read_bytes())
    counting = Counting(fast)
    summary = run(counting, [*files, copy], store)
    assert counting.calls == [["p01.png"]]
    assert (summary.scored, summary.cached) == (1, 4)
    rows = by_path(store, fast.identity)
    assert rows[str(copy)]["score"] == rows[str(files[3])]["score"]
    assert rows[str(files[1])]["score"] == pytest.approx(fast.score([files[1]])[0].score,
                                                         abs=2e-4)


def test_another_mode_is_another_identity(fast, tiny_loaded, small_pixels, store, tmp_path):
    from qponder_mlx.generate import SamplingConfig

    files = library(tmp_path / "lib", 3)
    run(fast, files, store)
    reason = Scorer(tiny_loaded, ScoreConfig(mode="reason", batch_size=4, pixels=small_pixels,
                                             sampling=SamplingConfig(max_tokens=4)))
    assert reason.identity != fast.identity
    summary = run(reason, files, store)
    # The random tiny model's 4 tokens hold no <answer>: counted, stored with the raw text.
    assert summary.scored + summary.no_score == 3 and summary.cached == 0
    rows = by_path(store, reason.identity)
    assert all(r["mode"] == "reason" and r["text"] and r["tokens"] == 4 for r in rows.values())
    assert store.result_count() == 6


BAD = {
    "truncated.jpg": "truncated or corrupt",
    "zero.png": "empty file",
    "notes.jpg": "not an image",
    "bomb.png": "too many pixels (decompression bomb)",
    "locked.png": "permission denied",
}


def odd_but_valid(root):
    """Images in every awkward-but-valid form a photo library holds."""
    from qponder_mlx.images import ensure_heif_support

    root.mkdir(parents=True, exist_ok=True)
    rgb = photo(root / "plain.png", 1)
    src = Image.open(rgb).convert("RGB")
    src.convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(np.asarray(src.convert("L"), dtype=np.uint16) * 257).save(root / "deep.png")
    assert Image.open(root / "deep.png").mode.startswith("I")
    pal = src.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(root / "palette_alpha.png", transparency=0)
    frames = [src, src.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    src.save(root / "rotated.jpg", exif=exif)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(root / "one_pixel.png")
    src.save(root / "photo.webp")
    src.save(root / "scan.tiff")
    src.save(root / "old.bmp")
    ensure_heif_support()
    src.save(root / "phone.heic")
    return sorted(p for p in root.iterdir() if p.name != "plain.png") + [rgb]


def bad_files(root):
    root.mkdir(parents=True, exist_ok=True)
    full = photo(root / "full.jpg", 5)
    (root / "truncated.jpg").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    (root / "zero.png").write_bytes(b"")
    (root / "notes.jpg").write_text("shopping list: milk, eggs\n")
    png_with_header(root / "bomb.png", 20000, 20000)
    photo(root / "locked.png", 6)
    return [root / n for n in BAD]


def refuse_reading(monkeypatch, name):
    """Root reads any file, so simulate the OS refusing `name` (as chmod 000 does for users)."""
    real_open = io_mod.open_regular

    def fake_open(path, *a, **k):
        if os.path.basename(str(path)) == name:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    # Every read of a file's bytes (hashing, then the read-once decode) goes through it.
    monkeypatch.setattr(io_mod, "open_regular", fake_open)


def test_bad_files_become_error_rows_and_odd_valid_files_score(fast, store, tmp_path,
                                                               monkeypatch):
    good = odd_but_valid(tmp_path / "lib" / "good")
    bad = bad_files(tmp_path / "lib" / "bad")
    refuse_reading(monkeypatch, "locked.png")
    summary = run(fast, [*good, *bad], store)
    assert summary.scored == len(good) == 11
    assert dict(summary.errors) == {reason: 1 for reason in BAD.values()}
    rows = by_path(store, fast.identity)
    for p in good:
        assert rows[str(p)]["error"] is None and 1 <= rows[str(p)]["score"] <= 5, p.name
    for p in bad:
        r = rows[str(p)]
        assert r["score"] is None and "\n" not in r["error"] and " — " in r["error"], r["error"]
        assert error_reason(r["error"]) == BAD[p.name]
    # The line says what to do.
    assert "fix the file permissions" in rows[str(bad[-1])]["error"]
    assert "downscale" in rows[str(tmp_path / "lib" / "bad" / "bomb.png")]["error"]

    # Rerun: broken content stays cached (not retried); the unreadable file is retried and,
    # once readable, scored, and its stale error row disappears.
    monkeypatch.undo()
    counting = Counting(fast)
    summary = run(counting, [*good, *bad], store)
    assert counting.calls == [["locked.png"]]
    assert summary.scored == 1 and summary.cached == len(good)
    assert sum(summary.errors.values()) == 4 and "permission denied" not in summary.errors
    assert by_path(store, fast.identity)[str(bad[-1])]["score"] is not None
    assert store.result_count(fast.identity) == len(good) + len(bad)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_permission_denied_for_real(fast, store, tmp_path):
    p = photo(tmp_path / "secret.png", 3)
    p.chmod(0)
    try:
        summary = run(fast, [p], store)
    finally:
        p.chmod(0o644)
    assert dict(summary.errors) == {"permission denied": 1}


def test_model_failures_are_stored_and_retried(fast, store, tmp_path, monkeypatch):
    files = library(tmp_path / "lib", 3)

    def boom(images):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(fast, "_run", boom)
    summary = run(fast, files, store)
    assert dict(summary.errors) == {"model failed": 3}
    monkeypatch.undo()
    summary = run(fast, files, store)
    assert summary.scored == 3 and not summary.errors


def test_stop_flag_ends_the_run_after_the_current_batch(fast, store, tmp_path):
    files = library(tmp_path / "lib", 9)
    stop = StopFlag()

    class StopAfterFirst(Counting):
        def score(self, items):
            out = super().score(items)
            stop.set()  # as Ctrl-C during the first batch would
            return out

    first = StopAfterFirst(fast)
    summary = run(first, files, store, stop=stop)
    done = first.n
    assert len(first.calls) == 1 and summary.interrupted
    assert store.result_count() == done and summary.pending == 9 - done
    counting = Counting(fast)
    summary = run(counting, files, store)
    assert summary.cached == done and summary.scored == 9 - done == counting.n
    assert not summary.interrupted


# ----------------------------------------------------------------------------- exports


def test_csv_and_jsonl_are_views_of_the_store(fast, store, tmp_path):
    files = library(tmp_path / "lib", 4)
    (tmp_path / "lib" / "=cmd.png").write_bytes(b"")  # a formula-looking, broken file
    files.append(tmp_path / "lib" / "=cmd.png")
    run(fast, files, store)
    rows = store.rows(fast.identity, map(str, files))
    write_csv(rows, tmp_path / "out.csv")
    write_jsonl(rows, tmp_path / "out.jsonl")
    got = list(csv.DictReader(io.StringIO((tmp_path / "out.csv").read_text())))
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [g["path"] for g in got] == [x["path"] for x in lines] == sorted(map(str, files))
    for g, j, r in zip(got, lines, rows):
        assert j["score"] == r["score"] and j["error"] == r["error"]
        assert (g["score"] == "" if r["score"] is None else float(g["score"]) == r["score"])
    # The error cell of the broken file is plain text; a path starting with "=" stays literal.
    broken = next(g for g in got if "cmd" in g["path"])
    assert broken["error"].startswith("empty file") and broken["score"] == ""
    assert sqlite3.connect(store.path).execute("SELECT COUNT(*) FROM results").fetchone()[0] == 5


def test_csv_cells_that_look_like_formulas_are_neutralised(tmp_path):
    row = {"path": "/x.jpg", "score": 3.5, "reasoning": "=HYPERLINK(\"http://evil\")",
           "error": None}
    write_csv([row], tmp_path / "o.csv")
    got = next(csv.DictReader(io.StringIO((tmp_path / "o.csv").read_text())))
    assert got["reasoning"] == "'=HYPERLINK(\"http://evil\")" and got["score"] == "3.5"

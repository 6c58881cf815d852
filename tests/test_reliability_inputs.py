"""The bad-input corpus (tests/reliability/corpus.py) through the real CLIs: `qponder score` and
`qponder eval --mode fast` on the tiny model. Promise: one clear line per problem, the job goes
on, a summary with counts, exit code non-zero only when nothing could be done."""

from __future__ import annotations

import builtins
import json
import os
import re
import tracemalloc
from collections import Counter

import pytest
from qponder_mlx.cli.main import app
from reliability.corpus import (
    IMAGE_KINDS,
    LABEL_FILE_KINDS,
    LABEL_ROW_KINDS,
    build_images,
    build_label_file,
    build_label_rows,
    good_image,
    is_root,
    write_long_line_jsonl,
)
from typer.testing import CliRunner

from qponder_mlx.labels import MAX_LINE_CHARS, read_labels
from qponder_mlx.library.score_job import error_reason

SMALL = ["--min-pixels", "3136", "--max-pixels", "12544"]
WORKING = [k for k in IMAGE_KINDS if not k.xfail]
KIND = {k.name: k for k in IMAGE_KINDS}


def run_cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output  # stdout and stderr, interleaved (click 8.2+)


@pytest.fixture
def refuse_unreadable(monkeypatch):
    """Make the OS refuse to open `no_permission.jpg` even for root (chmod 000 does that only for
    other users). Pillow goes through builtins.open, hashing and scoring through open_regular."""
    real_open = builtins.open

    def guarded(file, mode="r", *args, **kwargs):
        reading = not set(mode) & set("wax+")
        if reading and isinstance(file, (str, os.PathLike)) and \
                os.path.basename(os.fspath(file)) == "no_permission.jpg":
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    if is_root():
        monkeypatch.setattr(builtins, "open", guarded)
        # Hashing and the scorer's reads go through io.open_regular (os.open, not open).
        from qponder_mlx import io as io_mod

        real_regular = io_mod.open_regular

        def guarded_regular(file):
            if os.path.basename(os.fspath(file)) == "no_permission.jpg":
                raise PermissionError(13, "Permission denied", os.fspath(file))
            return real_regular(file)

        monkeypatch.setattr(io_mod, "open_regular", guarded_regular)


def one_line_errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# --------------------------------------------------------------------------------------------
# images


def test_image_corpus_through_score(tiny_model_dir, tmp_path, refuse_unreadable):
    paths = build_images(tmp_path / "photos", WORKING)
    out = tmp_path / "rows.jsonl"
    code, log = run_cli("score", tmp_path / "photos", "--model", tiny_model_dir, "--mode", "fast",
                        *SMALL, "--db", tmp_path / "r.sqlite", "--jsonl", out, "--no-progress")
    assert code == 0, log  # some images scored: the job succeeded
    assert "Traceback" not in log
    rows = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}

    expected_errors: Counter = Counter()
    for k in WORKING:
        path = str(paths[k.name])
        if k.outcome == "scored":
            r = rows[path]
            assert r["error"] is None and 1 <= r["score"] <= 5, (k.name, r)
        elif k.outcome == "error":
            r = rows[path]
            assert r["score"] is None and "\n" not in r["error"] and " — " in r["error"], r
            assert error_reason(r["error"]) == k.reason, (k.name, r["error"])
            expected_errors[k.reason] += 1
        elif k.outcome == "skipped":
            assert path not in rows
            line = [x for x in log.splitlines() if x.startswith("skipped:") and path in x]
            assert len(line) == 1 and k.reason in line[0], (k.name, log)
        else:  # ignored: a folder named .jpg is walked as a folder
            assert path not in rows

    n_scored = sum(k.outcome == "scored" for k in WORKING)
    n_errors = sum(expected_errors.values())
    assert len(rows) == n_scored + n_errors
    assert (f"{n_scored + n_errors} files: {n_scored} scored, 0 cached (skipped), "
            f"{n_errors} errors") in log
    summary = re.search(r"^errors: (.*)$", log, re.M).group(1)
    got = dict(re.fullmatch(r"(.+) (\d+)", part.strip()).groups() for part in summary.split(","))
    assert {k: int(v) for k, v in got.items()} == dict(expected_errors), summary


def test_image_corpus_through_eval(tiny_model_dir, tmp_path, refuse_unreadable):
    """The same images listed in a label file: each is either skipped while reading the labels
    (one line) or fails while scoring (counted), and the good ones are scored."""
    kinds = [k for k in WORKING if k.outcome != "ignored"]
    paths = build_images(tmp_path / "photos", kinds)
    labels = tmp_path / "photos" / "labels.jsonl"
    labels.write_text("".join(json.dumps({"image": paths[k.name].name, "mos": 3.0,
                                          "id": k.name}) + "\n" for k in kinds))
    report = tmp_path / "report.json"
    code, log = run_cli("eval", "--data", labels, "--model", tiny_model_dir, "--mode", "fast",
                        *SMALL, "--out", report)
    assert code == 0, log
    rep = json.loads(report.read_text())
    samples = {s["id"]: s for s in rep["samples"]}
    skipped_lines = [x for x in log.splitlines() if x.startswith("skipped:")]
    for k in kinds:
        name = paths[k.name].name
        if k.outcome == "scored":
            assert samples[k.name]["score"] is not None, (k.name, samples[k.name])
        elif k.name in samples:  # header fine, pixels not: fails while scoring
            assert samples[k.name]["error"] and "\n" not in samples[k.name]["error"]
        else:  # refused while reading the labels: exactly one line names it
            assert sum(name in x for x in skipped_lines) == 1, (k.name, log)
    n_bad = sum(k.outcome != "scored" for k in kinds)
    assert rep["n_bad_labels"] + rep["n_images_failed"] == n_bad
    assert rep["n_scored"] == len(kinds) - n_bad
    assert (f"({rep['n_bad_labels']} bad label rows, {rep['n_images_failed']} unreadable "
            "images)") in log


def test_broken_symlink_is_an_error_row(tiny_model_dir, tmp_path):
    photos = tmp_path / "photos"
    good_image(photos / "ok.png")
    link = build_images(photos, [KIND["broken_symlink"]])["broken_symlink"]
    out = tmp_path / "r.jsonl"
    code, log = run_cli("score", photos, "--model", tiny_model_dir, "--mode", "fast", *SMALL,
                        "--db", tmp_path / "r.sqlite", "--no-progress", "--jsonl", out)
    assert code == 0, log
    assert "2 files: 1 scored, 0 cached (skipped), 1 errors" in log and "broken link 1" in log
    assert not any(x.startswith("skipped:") for x in log.splitlines()), log
    rows = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows[str(link)]["error"].startswith("broken link (its target is gone) — fix")


def test_non_utf8_file_name_does_not_stop_the_job(tiny_model_dir, tmp_path):
    photos = tmp_path / "photos"
    good_image(photos / "ok.png")
    build_images(photos, [KIND["non_utf8_name"]])
    out = tmp_path / "r.jsonl"
    code, log = run_cli("score", photos, "--model", tiny_model_dir, "--mode", "fast", *SMALL,
                        "--db", tmp_path / "r.sqlite", "--no-progress", "--jsonl", out)
    # Scored, or an error row saying to rename it; the export stays valid UTF-8 JSON lines.
    assert code == 0, log
    rows = [json.loads(x) for x in out.read_bytes().decode("utf-8").splitlines()]
    bad = [r for r in rows if "caf" in r["path"]]
    assert len(rows) == 2 and len(bad) == 1, rows
    if "2 files: 2 scored" not in log:
        assert "2 files: 1 scored, 0 cached (skipped), 1 errors" in log, log
        assert bad[0]["path"].endswith("caf\\udce9_latin1.jpg")  # the byte, escaped
        assert "not valid UTF-8 — rename it" in bad[0]["error"]


def test_score_exits_nonzero_when_nothing_could_be_scored(tiny_model_dir, tmp_path):
    kinds = [k for k in WORKING if k.name in ("truncated_jpeg", "zero_byte", "html_as_png")]
    build_images(tmp_path / "bad", kinds)
    code, log = run_cli("score", tmp_path / "bad", "--model", tiny_model_dir, "--mode", "fast",
                        *SMALL, "--db", tmp_path / "r.sqlite", "--no-progress")
    assert "3 files: 0 scored, 0 cached (skipped), 3 errors" in log
    assert code != 0


def test_eval_exits_nonzero_when_nothing_could_be_scored(tiny_model_dir, tmp_path):
    kinds = [k for k in WORKING if k.name in ("truncated_jpeg", "strip")]
    paths = build_images(tmp_path / "bad", kinds)
    labels = tmp_path / "bad" / "l.jsonl"
    labels.write_text("".join(json.dumps({"image": p.name, "mos": 3.0}) + "\n"
                              for p in paths.values()))
    code, log = run_cli("eval", "--data", labels, "--model", tiny_model_dir, "--mode", "fast",
                        *SMALL)
    assert "n 0/2" in log
    assert code != 0


# --------------------------------------------------------------------------------------------
# label files


def test_label_row_corpus_through_eval(tiny_model_dir, tmp_path):
    labels, line_of, n_good = build_label_rows(tmp_path, tmp_path / "imgs")
    code, log = run_cli("eval", "--data", labels, "--images-root", tmp_path / "imgs",
                        "--model", tiny_model_dir, "--mode", "fast", *SMALL)
    assert code == 0, log
    skipped = [x for x in log.splitlines() if x.startswith("skipped:")]
    assert len(skipped) == len(LABEL_ROW_KINDS)  # one line per bad row, nothing else
    for k in LABEL_ROW_KINDS:
        mine = [x for x in skipped if f"{labels} line {line_of[k.name]}:" in x]
        assert len(mine) == 1 and k.reason in mine[0], (k.name, mine)
        assert " — " in mine[0]  # and it says what to do
    assert f"n {n_good}/{n_good}" in log
    assert f"({len(LABEL_ROW_KINDS)} bad label rows, 0 unreadable images)" in log


@pytest.mark.parametrize("kind", LABEL_FILE_KINDS, ids=lambda k: k.name)
def test_label_file_corpus_through_eval(kind, tiny_model_dir, tmp_path):
    labels = build_label_file(kind.name, tmp_path, tmp_path / "imgs")
    code, log = run_cli("eval", "--data", labels, "--images-root", tmp_path / "imgs",
                        "--model", tiny_model_dir, "--mode", "fast", *SMALL)
    assert "Traceback" not in log
    if kind.outcome == "usable":
        assert code == 0, log
        assert re.search(r"n (\d)/\1 ", log), log  # every usable row scored
        if kind.reason:
            assert sum(kind.reason in x for x in log.splitlines()) == 1, log
    else:
        assert code == 2, log  # nothing could be done
        assert len(one_line_errors(log)) == 1 and kind.reason in log, log


def test_a_200mb_line_is_skipped_in_bounded_memory(tmp_path):
    """The reader streams: a 200 MB line costs a few MB, not two copies of 200 MB."""
    imgs = tmp_path / "imgs"
    for i in range(2):
        good_image(imgs / f"good_{i}.png")
    labels = write_long_line_jsonl(tmp_path / "long.jsonl", [
        json.dumps({"image": f"good_{i}.png", "mos": 3.0, "id": f"g{i}"}) for i in range(2)])
    assert labels.stat().st_size > 200 * 1024 * 1024
    tracemalloc.start()
    try:
        samples, problems = read_labels(labels, images_root=imgs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [s.id for s in samples] == ["g0", "g1"]
    assert [(p.row, "longer than" in p.message) for p in problems] == [(2, True)]
    assert peak < 8 * MAX_LINE_CHARS, f"peak {peak / 1e6:.0f} MB"  # str chars take 1-4 bytes


def test_line_just_under_the_limit_is_read(tmp_path):
    imgs = tmp_path / "imgs"
    good_image(imgs / "a.png")
    head = '{"image": "a.png", "mos": 3.0, "pad": "'
    line = head + "x" * (MAX_LINE_CHARS - len(head) - 3) + '"}'
    assert len(line) + 1 == MAX_LINE_CHARS  # with its newline: exactly at the limit
    at_limit = line + "\n"  # the newline is the limit-th character
    also_at_limit = line[:-2] + "x" + line[-2:] + "\n"  # one more: the limit + its newline
    over = line[:-2] + "xx" + line[-2:] + "\n"
    (tmp_path / "l.jsonl").write_text(at_limit + also_at_limit + over + at_limit)
    samples, problems = read_labels(tmp_path / "l.jsonl", images_root=imgs)
    assert [s.id for s in samples] == ["a.png"]
    # lines 2 and 4 are read (and are duplicates of line 1); only line 3 is too long
    assert sorted((p.row, "longer than" in p.message) for p in problems) == \
        [(2, False), (3, True), (4, False)]


def test_label_paths_cannot_escape_their_root(tmp_path):
    """Dataset formats always, free-form formats whenever --images-root is given."""
    root = tmp_path / "dataset" / "images"
    good_image(root / "in.png")
    secret = good_image(tmp_path / "private" / "me.png")
    (root / "link_out").symlink_to(tmp_path / "private")  # a link is a folder the user made
    koniq = tmp_path / "dataset" / "koniq10k_scores.csv"
    koniq.write_text("image_name,MOS,SD,c_total\nin.png,3.0,0.5,10\n"
                     f"../../private/me.png,3.0,0.5,10\n{secret},3.0,0.5,10\n")
    samples, problems = read_labels(koniq, images_root=root)
    assert [s.id for s in samples] == ["in.png"]
    assert len(problems) == 2 and all("leaves the images root" in str(p) for p in problems)

    jsonl = tmp_path / "dataset" / "l.jsonl"
    jsonl.write_text("".join(json.dumps({"image": p, "mos": 3.0}) + "\n" for p in (
        "in.png", "../../private/me.png", str(secret), "sub/../../../private/me.png",
        "link_out/me.png")))
    samples, problems = read_labels(jsonl, images_root=root)
    # A symlink the user placed under the root is theirs (the reader is lexical on purpose:
    # image folders are often links to another disk); every textual escape is refused.
    assert sorted(s.id for s in samples) == ["in.png", "link_out/me.png"]
    assert [p.row for p in problems] == [2, 3, 4]


def test_corpus_has_at_least_30_kinds():
    names = [k.name for k in IMAGE_KINDS + LABEL_ROW_KINDS + LABEL_FILE_KINDS]
    assert len(names) == len(set(names)) and len(names) >= 30

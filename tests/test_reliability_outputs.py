"""Outputs that could destroy inputs, stores that are not ours, damaged or locked stores, full
disks: each refused or reported in one line naming the cause and the fix; nothing earlier lost.

Disk-full cases use a tiny tmpfs when this machine lets us mount one (root with CAP_SYS_ADMIN);
elsewhere they are skipped with that reason, and `test_a_failed_export_write_is_one_line`
covers the message path everywhere by making the write raise ENOSPC.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image
from qponder_mlx.cli.main import app
from typer.testing import CliRunner

from qponder_mlx.io import atomic_write_text
from qponder_mlx.library import ResultStore, StoreError
from qponder_mlx.library import store as store_mod
from qponder_mlx.safe_paths import OutputPathError, check_output

SMALL = ["--min-pixels", "3136", "--max-pixels", "12544"]


def cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def photos(folder: Path, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"photo{i}.jpg"
        Image.new("RGB", (64, 48), (40 * i, 90, 200 - 30 * i)).save(p, quality=90)
        out.append(p)
    return out


def result_row(i: int, text: str = "") -> dict:
    return {"sha256": f"{i:064x}", "identity": "m:fast", "path": f"/p/{i}.jpg", "score": 3.0,
            "text": text, "format_ok": 1, "mode": "fast", "model": "m", "weights": "w",
            "prompt_version": "v1", "scored_at": 0.0}


def filled_store(path: Path, n: int, text: str = "") -> None:
    with ResultStore(path) as s, s.transaction():
        s.put_results([result_row(i, text) for i in range(n)])


# --------------------------------------------------------------------------------------------
# 1. outputs never overwrite the store, an input, or someone else's file


def test_score_refuses_an_export_onto_the_store_or_an_input_photo(tmp_path, tiny_model_dir):
    imgs = photos(tmp_path / "g")
    db = tmp_path / "s.sqlite"
    filled_store(db, 3)
    before = {p: sha(p) for p in [db, *imgs]}
    for option, target in (("--csv", db), ("--jsonl", db), ("--report", imgs[0]),
                           ("--csv", imgs[1])):
        code, out = cli("score", tmp_path / "g", "--db", db, option, target,
                        "--model", tiny_model_dir, "--mode", "fast", *SMALL)
        assert code == 2, out
        (line,) = errors(out)
        what = "the results store" if target == db else "one of the input files"
        assert f"{option} {target} is {what}" in line and "pick another file name" in line
    assert {p: sha(p) for p in before} == before  # nothing was written
    assert ResultStore(db).result_count() == 3


def test_score_refuses_a_foreign_existing_file_unless_forced(tmp_path, tiny_model_dir):
    photos(tmp_path / "g")
    notes = tmp_path / "notes.html"
    notes.write_text("<html>my notes</html>")
    args = ["score", tmp_path / "g", "--db", tmp_path / "s.sqlite", "--model", tiny_model_dir,
            "--mode", "fast", *SMALL, "--no-progress"]
    code, out = cli(*args, "--report", notes)
    assert code == 2 and "exists and is not a qponder HTML report" in errors(out)[0]
    assert "--force" in errors(out)[0] and notes.read_text() == "<html>my notes</html>"
    code, out = cli(*args, "--report", notes, "--force", "--csv", tmp_path / "o.csv")
    assert code == 0, out
    assert notes.read_text().startswith("<!DOCTYPE html>")
    # Our own outputs are recognised and replaced on the next run without --force.
    code, out = cli(*args, "--report", notes, "--csv", tmp_path / "o.csv")
    assert code == 0, out


def test_eval_refuses_out_onto_a_photo_or_the_label_file(tmp_path, tiny_model_dir):
    imgs = photos(tmp_path / "g")
    labels = tmp_path / "g" / "labels.jsonl"
    labels.write_text("".join(json.dumps({"image": p.name, "mos": 3.0}) + "\n" for p in imgs))
    stranger = tmp_path / "other.jpg"
    stranger.write_bytes(imgs[0].read_bytes())
    before = {p: sha(p) for p in [*imgs, labels, stranger]}
    for target, why in ((imgs[1], "is one of the input files"),
                        (labels, "is one of the input files"),
                        (stranger, "exists and is not a qponder eval report")):
        code, out = cli("eval", "--data", labels, "--out", target, "--model", tiny_model_dir,
                        "--mode", "fast", *SMALL)
        assert code == 2 and why in errors(out)[0], out
    assert {p: sha(p) for p in before} == before


def test_output_kinds_are_recognised(tmp_path):
    report = tmp_path / "r.html"
    from qponder_mlx.library.report import render_report
    atomic_write_text(report, render_report([], {}))
    check_output("--report", report, "report")  # ours: fine
    csv = tmp_path / "o.csv"
    from qponder_mlx.library.tables import write_csv, write_jsonl
    write_csv([], csv)
    check_output("--csv", csv, "csv")
    jsonl = tmp_path / "o.jsonl"
    write_jsonl([{"path": "/a", "sha256": "x", "identity": "i"}], jsonl)
    check_output("--jsonl", jsonl, "jsonl")
    for option, kind in (("--csv", "csv"), ("--jsonl", "jsonl"), ("--report", "report"),
                         ("--out", "eval_json")):
        with pytest.raises(OutputPathError, match="--force"):
            check_output(option, tmp_path / "r.html" if kind != "report" else csv, kind)
    with pytest.raises(OutputPathError, match="is a folder"):
        check_output("--csv", tmp_path, "csv")


def test_distill_refuses_out_onto_its_label_file_or_an_image(tmp_path):
    from qponder_mlx.distill import DistillConfig
    from qponder_mlx.distill.distill_job import DistillError, run_distill
    from qponder_mlx.labels import read_labels

    imgs = photos(tmp_path / "g")
    labels = tmp_path / "g" / "labels.jsonl"
    labels.write_text("".join(json.dumps({"image": p.name, "mos": 3.0}) + "\n" for p in imgs))
    code, out = cli("distill", "--data", labels, "--out", labels, "--teacher-url",
                    "http://127.0.0.1:9/v1", "--teacher-model", "m")
    assert code == 2 and "is the label file (--data)" in errors(out)[0], out
    # A photo as --out: the torn-tail cut would have truncated it; refused before any write.
    torn = tmp_path / "g" / "photo1.jpg"
    before = sha(torn)
    samples, _ = read_labels(labels)
    cfg = DistillConfig(teacher_url="http://127.0.0.1:9/v1", teacher_model="m")
    with pytest.raises(DistillError, match="one of the input files"):
        run_distill(samples, object(), cfg, torn)
    assert sha(torn) == before
    code, out = cli("distill", "--data", labels, "--out", imgs[0], "--teacher-url",
                    "http://127.0.0.1:9/v1", "--teacher-model", "m")
    assert code == 2 and "one of the input files" in errors(out)[0], out


# --------------------------------------------------------------------------------------------
# 3. another program's SQLite file is never changed; 7. a damaged store is named


def test_another_programs_sqlite_is_refused_before_any_write(tmp_path, tiny_model_dir):
    other = tmp_path / "contacts.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE contacts (name TEXT, phone TEXT)")
    con.execute("INSERT INTO contacts VALUES ('Ada', '555')")
    con.commit()
    con.close()
    before = sha(other)
    with pytest.raises(StoreError, match="another program.*tables: contacts.*new --db"):
        ResultStore(other)
    photos(tmp_path / "g")
    code, out = cli("score", tmp_path / "g", "--db", other, "--model", tiny_model_dir,
                    "--mode", "fast", *SMALL)
    assert code == 2 and len(errors(out)) == 1 and "another program" in out
    assert sha(other) == before and not Path(f"{other}-wal").exists()
    con = sqlite3.connect(other)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not switched to WAL
    con.close()


def test_an_empty_sqlite_file_and_an_old_store_without_the_marker_are_taken(tmp_path):
    empty = tmp_path / "empty.sqlite"
    sqlite3.connect(empty).close()  # 0 bytes
    ResultStore(empty).close()
    blank = tmp_path / "blank.sqlite"
    con = sqlite3.connect(blank)
    con.execute("PRAGMA user_version=1")  # a valid, table-less database
    con.commit()
    con.close()
    with ResultStore(blank) as s:
        assert s.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == "1"


def corrupt_a_page(db: Path) -> None:
    """Overwrite one interior page of the results table with garbage, as a bad sector would."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = con.execute("PRAGMA page_size").fetchone()[0]
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name='results'").fetchone()[0]
    con.close()
    data = bytearray(db.read_bytes())
    start = root * page + page  # a page after the results root: one of its leaves
    assert start + page <= len(data)
    data[start:start + page] = os.urandom(page)
    db.write_bytes(bytes(data))


def test_a_damaged_store_is_named_with_the_recovery(tmp_path, tiny_model_dir):
    db = tmp_path / "s.sqlite"
    filled_store(db, 60, text="reasoning " * 40)
    corrupt_a_page(db)
    con = sqlite3.connect(db)
    try:
        ok = con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    except sqlite3.DatabaseError:
        ok = False
    con.close()
    assert not ok, "the corruption must be one SQLite sees"
    with pytest.raises(StoreError) as exc:
        ResultStore(db)
    msg = str(exc.value)
    assert "damaged" in msg and "--db new.sqlite" in msg and "\n" not in msg
    photos(tmp_path / "g")
    code, out = cli("score", tmp_path / "g", "--db", db, "--model", tiny_model_dir, "--mode",
                    "fast", *SMALL)
    assert code == 2 and "damaged" in errors(out)[0] and "cached" not in out


def test_quick_check_on_open_is_cheap(tmp_path):
    db = tmp_path / "s.sqlite"
    filled_store(db, 20000, text="x" * 200)  # ~20,000 photos of reasoning
    t0 = time.perf_counter()
    ResultStore(db).close()
    assert time.perf_counter() - t0 < 1.0


# --------------------------------------------------------------------------------------------
# 9. a store locked by another process: a message, then one line


def hold_write_lock(db: Path, seconds: float) -> threading.Event:
    """Another connection holds the write lock for `seconds` or until the event is set."""
    ready, release = threading.Event(), threading.Event()

    def hold():
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        ready.set()
        release.wait(seconds)
        con.execute("ROLLBACK")
        con.close()

    threading.Thread(target=hold, daemon=True).start()
    ready.wait(5)
    return release


def test_a_locked_store_waits_with_a_message_then_fails_in_one_line(tmp_path):
    db = tmp_path / "s.sqlite"
    filled_store(db, 1)
    said: list[str] = []
    release = hold_write_lock(db, 10.0)
    with ResultStore(db, lock_wait_s=1.0, on_wait=said.append) as s:
        t0 = time.perf_counter()
        with pytest.raises(StoreError) as exc, s.transaction():
            pass
        waited = time.perf_counter() - t0
    assert 0.9 < waited < 2.5
    assert len(said) == 1 and "another process is writing" in said[0]
    assert "still locked by another process after 1 s" in str(exc.value)
    assert "\n" not in str(exc.value)
    release.set()
    # A lock released within the wait: the write goes through.
    hold_write_lock(db, 0.5)
    with ResultStore(db, lock_wait_s=5.0, on_wait=said.append) as s, s.transaction():
        s.put_results([result_row(7)])
    assert ResultStore(db).result_count() == 2


def test_score_on_a_locked_store_ends_in_one_line(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(store_mod, "LOCK_WAIT_S", 1.0)
    monkeypatch.setattr(store_mod, "LOCK_NOTICE_S", 0.3)
    db = tmp_path / "s.sqlite"
    filled_store(db, 1)
    photos(tmp_path / "g")
    release = hold_write_lock(db, 30.0)
    code, out = cli("score", tmp_path / "g", "--db", db, "--model", tiny_model_dir, "--mode",
                    "fast", *SMALL, "--no-progress")
    release.set()
    assert code == 2, out
    assert "Traceback" not in out and "still locked" in errors(out)[0]


# --------------------------------------------------------------------------------------------
# 8. disk full: one line, what failed, that nothing was lost, how to resume


@contextmanager
def tmpfs(parent: Path, options: str, why_skip: str = ""):
    """A tmpfs mounted with `options` (unmounted afterwards), or a skip saying why not."""
    mnt = parent / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}){why_skip}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs."""
    with tmpfs(tmp_path, "size=256k",
               "; test_a_failed_export_write_is_one_line covers the message") as mnt:
        yield mnt


@pytest.fixture
def ro_disk(tmp_path):
    """A read-only tmpfs (root ignores chmod, not a read-only mount)."""
    with tmpfs(tmp_path, "ro,size=64k") as mnt:
        yield mnt


def test_a_read_only_output_folder_is_one_line(ro_disk, tmp_path, tiny_model_dir):
    photos(tmp_path / "g")
    base = ["score", tmp_path / "g", "--model", tiny_model_dir, "--mode", "fast", *SMALL,
            "--no-progress"]
    code, out = cli(*base, "--db", ro_disk / "s.sqlite")
    assert code == 2 and "Traceback" not in out, out
    (line,) = errors(out)
    assert f"{ro_disk / 's.sqlite'}: cannot open the results database" in line
    assert "writable" in line
    db = tmp_path / "s.sqlite"
    code, out = cli(*base, "--db", db, "--report", ro_disk / "r.html")
    assert code == 2 and "cannot write (read-only file system)" in errors(out)[0], out
    assert ResultStore(db).result_count() == 2  # the scores were saved before the export


def fill(folder: Path) -> None:
    fd = os.open(folder / "ballast", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_full_disk_under_the_store_keeps_every_committed_batch(tiny_disk):
    db = tiny_disk / "s.sqlite"
    committed = 0
    with ResultStore(db) as s, pytest.raises(StoreError) as exc:
        for batch in range(1000):
            with s.transaction():
                s.put_results([result_row(batch * 10 + i, "x" * 4000) for i in range(10)])
            committed += 10
    msg = str(exc.value)
    assert "cannot save to the results store" in msg and "disk" in msg and "\n" not in msg
    assert "everything saved before is intact" in msg and "rerun" in msg
    assert committed > 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    assert con.execute("SELECT COUNT(*) FROM results").fetchone()[0] == committed
    con.close()


def test_exports_to_a_full_disk_fail_in_one_line(tiny_disk, tmp_path, tiny_model_dir):
    imgs = photos(tmp_path / "g")
    fill(tiny_disk)
    db = tmp_path / "s.sqlite"
    base = ["score", tmp_path / "g", "--db", db, "--model", tiny_model_dir, "--mode", "fast",
            *SMALL, "--no-progress"]
    for option in ("--csv", "--report"):
        code, out = cli(*base, option, tiny_disk / f"out{option[2:]}")
        assert code == 2, out
        (line,) = errors(out)
        assert f"{option} {tiny_disk}" in line and "cannot write (disk full)" in line
        assert f"nothing was lost: every score is in {db}" in line and "Traceback" not in out
    assert ResultStore(db).result_count() == len(imgs)
    labels = tmp_path / "g" / "labels.jsonl"
    labels.write_text("".join(json.dumps({"image": p.name, "mos": 3.0}) + "\n" for p in imgs))
    code, out = cli("eval", "--data", labels, "--out", tiny_disk / "e.json", "--model",
                    tiny_model_dir, "--mode", "fast", *SMALL)
    assert code == 2 and "cannot write (disk full)" in errors(out)[0], out
    assert not [p for p in tiny_disk.iterdir() if p.name != "ballast"]  # no temp files left


def test_a_failed_export_write_is_one_line(tmp_path, tiny_model_dir, monkeypatch):
    """Everywhere (no mount needed): the write raises ENOSPC as a full disk would."""
    photos(tmp_path / "g")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("qponder_mlx.library.write_csv", full)
    code, out = cli("score", tmp_path / "g", "--db", tmp_path / "s.sqlite", "--csv",
                    tmp_path / "o.csv", "--model", tiny_model_dir, "--mode", "fast", *SMALL,
                    "--no-progress")
    assert code == 2 and "cannot write (disk full)" in errors(out)[0] and "Traceback" not in out


# --------------------------------------------------------------------------------------------
# 12. a long output name: the temporary name stays short


def test_a_250_character_report_name_is_written(tmp_path):
    name = "r" * 245 + ".html"
    atomic_write_text(tmp_path / name, "<!DOCTYPE html>")
    assert (tmp_path / name).read_text() == "<!DOCTYPE html>"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_distill_onto_a_full_disk_fails_in_one_line(tiny_disk, tmp_path):
    from reliability.fault_servers import Behaviour, chat_body, serve

    imgs = photos(tmp_path / "g")
    labels = tmp_path / "g" / "labels.jsonl"
    labels.write_text("".join(json.dumps({"image": p.name, "mos": 3.0}) + "\n" for p in imgs))
    fill(tiny_disk)
    good = ("<think>The photo is sharp with little noise and balanced exposure.</think>"
            "<answer>3.00</answer>")
    with serve(Behaviour("fixed", body=chat_body(good))) as srv:
        code, out = cli("distill", "--data", labels, "--out", tiny_disk / "d.jsonl",
                        "--teacher-url", srv.url, "--teacher-model", "m")
    assert code == 2 and "Traceback" not in out, out
    (line,) = errors(out)
    assert f"--out {tiny_disk / 'd.jsonl'}: cannot write (disk full)" in line
    assert "rerun the same command to resume" in line


def test_train_onto_a_full_disk_is_one_line_with_the_resume_command(tiny_disk, tmp_path,
                                                                   tiny_model_dir):
    from qponder_mlx.testing.sft_sets import cc0_sft_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", cc0_sft_rows(2))
    fill(tiny_disk)
    out = tiny_disk / "run"
    code, text = cli("train", "--model", tiny_model_dir, "--data", data, "--out", out,
                     "--iters", "1", "--batch-size", "2", *SMALL, "--no-progress")
    assert code == 2, text
    (line,) = errors(text)
    assert f"--out {out}: cannot write (disk full" in line and "Traceback" not in text
    assert f"qponder train --stage sft --out {out} --resume" in line


def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(tiny_disk, tmp_path,
                                                                tiny_model_dir):
    fill(tiny_disk)
    out = tiny_disk / "bundle"
    code, text = cli("export", "--model", tiny_model_dir, "--out", out, "--target", "python",
                     "--no-agreement")
    assert code == 2, text
    (line,) = errors(text)
    assert f"--out {out}: cannot write (disk full)" in line and "Traceback" not in text
    assert not [p for p in tiny_disk.iterdir() if p.name != "ballast"]

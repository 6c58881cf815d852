"""Atomic writes and crash-tolerant JSONL."""

import os
import stat

import pytest

from qponder_mlx.io import (
    append_jsonl,
    atomic_write_jsonl,
    atomic_write_text,
    read_jsonl,
    truncate_torn_tail,
)


def test_atomic_write_gives_normal_permissions_and_replaces(tmp_path):
    p = tmp_path / "a.txt"
    old = os.umask(0o022)
    try:
        atomic_write_text(p, "one")
        atomic_write_text(p, "two")
    finally:
        os.umask(old)
    assert p.read_text() == "two"
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]  # no temp file left


def test_atomic_jsonl_writes_the_lines_append_writes(tmp_path):
    rows = [{"id": "café", "mos": 3.5}, {"id": "b", "path": tmp_path}]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for r in rows:
        append_jsonl(a, r)
    atomic_write_jsonl(b, iter(rows))  # a generator is enough
    assert b.read_bytes() == a.read_bytes()
    assert '"café"' in b.read_text(encoding="utf-8")  # not escaped
    assert list(read_jsonl(b)) == [rows[0], {"id": "b", "path": str(tmp_path)}]
    atomic_write_jsonl(b, rows[:1])  # replaces the whole file
    assert list(read_jsonl(b)) == rows[:1]


def test_torn_tail_is_cut_and_reading_skips_it(tmp_path):
    p = tmp_path / "log.jsonl"
    append_jsonl(p, {"a": 1})
    with p.open("a") as f:
        f.write('{"a": 2, "b"')  # a write killed half-way
    assert list(read_jsonl(p)) == [{"a": 1}]
    assert truncate_torn_tail(p) is True
    append_jsonl(p, {"a": 3})
    assert list(read_jsonl(p)) == [{"a": 1}, {"a": 3}]
    assert truncate_torn_tail(p) is False


def test_a_corrupt_middle_line_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        list(read_jsonl(p))

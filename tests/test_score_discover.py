"""Which files `qponder score` picks up from the paths it is given, and in what order."""

from __future__ import annotations

import os

import pytest
from fixtures_labels import make_image

from qponder_mlx.library.discover import IMAGE_SUFFIXES, discover


def names(found, root):
    return [str(p.relative_to(root)) for p in found.files]


def test_every_supported_suffix_in_any_case_is_found(tmp_path):
    for i, suffix in enumerate(sorted(IMAGE_SUFFIXES)):
        (tmp_path / f"img{i}{suffix.upper() if i % 2 else suffix}").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "IMG_0001.xmp").write_text("x")
    found = discover([tmp_path])
    assert len(found.files) == len(IMAGE_SUFFIXES)
    assert {".heic", ".heif", ".gif", ".tiff", ".tif", ".webp", ".bmp"} <= IMAGE_SUFFIXES
    assert found.skipped == 2


def test_recursive_by_default_hidden_entries_skipped_and_sorted(tmp_path):
    for rel in ["b/2.jpg", "b/10.jpg", "a/z.png", "a/deep/er/x.webp", "top.jpg",
                ".cache/hidden.jpg", "a/.thumbs/t.jpg", "a/._resource.jpg", "a-b/y.jpg"]:
        make_image(tmp_path / rel)
    found = discover([tmp_path])
    # Sorted by path components: a folder's files and sub-folders before a sibling "a-b".
    assert names(found, tmp_path) == ["a/deep/er/x.webp", "a/z.png", "a-b/y.jpg", "b/10.jpg",
                                      "b/2.jpg", "top.jpg"]
    assert all(p.is_absolute() for p in found.files)
    flat = discover([tmp_path], recursive=False)
    assert names(flat, tmp_path) == ["top.jpg"]


def test_order_does_not_depend_on_argument_order_and_duplicates_collapse(tmp_path):
    for rel in ["x/1.jpg", "x/2.jpg", "y/3.jpg"]:
        make_image(tmp_path / rel)
    a = discover([tmp_path / "y", tmp_path / "x", tmp_path / "x" / "1.jpg"])
    b = discover([tmp_path / "x", tmp_path / "y"])
    assert a.files == b.files
    assert names(a, tmp_path) == ["x/1.jpg", "x/2.jpg", "y/3.jpg"]


def test_explicit_files_and_missing_paths(tmp_path):
    img = make_image(tmp_path / ".hidden_but_named.png")
    (tmp_path / "notes.txt").write_text("not a photo")
    found = discover([img, tmp_path / "nope.jpg", tmp_path / "notes.txt"])
    assert found.files == [img]  # naming a hidden file explicitly includes it
    assert len(found.problems) == 1
    assert "nope.jpg" in found.problems[0] and "no such file" in found.problems[0]
    assert "\n" not in found.problems[0]
    assert found.skipped == 1  # notes.txt


def test_symlink_loops_terminate_and_linked_folders_are_walked_once(tmp_path):
    make_image(tmp_path / "lib" / "a.jpg")
    make_image(tmp_path / "lib" / "sub" / "b.jpg")
    make_image(tmp_path / "elsewhere" / "c.jpg")
    os.symlink(tmp_path / "lib", tmp_path / "lib" / "sub" / "loop")  # points back up
    os.symlink(tmp_path / "lib" / "sub", tmp_path / "lib" / "again")  # a second way in
    os.symlink(tmp_path / "elsewhere", tmp_path / "lib" / "linked")  # followed
    os.symlink(tmp_path / "missing", tmp_path / "lib" / "dangling.jpg")  # an error row
    found = discover([tmp_path / "lib"])
    got = sorted(p.name for p in found.files)
    assert got == ["a.jpg", "b.jpg", "c.jpg"]
    assert found.problems == []
    assert [(os.path.basename(p), why.split(" (")[0]) for p, why in found.errors] == [
        ("dangling.jpg", "broken link")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can list any folder")
def test_unreadable_folder_is_a_problem_not_a_crash(tmp_path):
    make_image(tmp_path / "ok" / "a.jpg")
    locked = tmp_path / "locked"
    make_image(locked / "b.jpg")
    locked.chmod(0)
    try:
        found = discover([tmp_path])
    finally:
        locked.chmod(0o755)
    assert [p.name for p in found.files] == ["a.jpg"]
    assert any("locked" in p and "permissions" in p for p in found.problems)

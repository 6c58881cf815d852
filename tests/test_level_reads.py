"""bench/level_reads.py's counting: shares of right answers, mixed groups and groups with a right
answer, checked on a hand-counted example."""

from __future__ import annotations

import pytest
from bench_loader import load_bench


@pytest.fixture(scope="module")
def level_reads():
    return load_bench("level_reads")


def test_group_stats_counts_right_mixed_and_any_right_by_hand(level_reads):
    truths = [("jpeg", 2), ("jpeg", 2), ("blur", 1)]
    reads = [[("jpeg", 2), ("jpeg", 3), ("jpeg", 2), None],   # mixed, 2 right, 1 unreadable
             [("jpeg", 1), ("jpeg", 1), ("jpeg", 1), ("jpeg", 1)],  # one level, the wrong one
             [("blur", 1)] * 4]                                  # all right, not mixed
    stats = level_reads.group_stats(truths, reads)
    j2 = stats[("jpeg", 2)]
    assert (j2["images"], j2["answers"], j2["right"], j2["mixed"], j2["any_right"],
            j2["unread"]) == (2, 8, 2, 1, 1, 1)
    assert level_reads.shares(j2) == {"right": 0.25, "mixed": 0.5, "any_right": 0.5}
    assert level_reads.shares(stats[("blur", 1)]) == {"right": 1.0, "mixed": 0.0,
                                                      "any_right": 1.0}
    with pytest.raises(ValueError):  # one group per image, or the counts would be silently off
        level_reads.group_stats(truths, reads[:2])


def test_pick_rows_takes_per_level_rows_of_every_level_reproducibly(level_reads):
    rows = [{"id": f"{k}{lv}_{i}", "distortion": k, "level": lv}
            for k in ("blur", "noise") for lv in (1, 2) for i in range(5)]
    picked = level_reads.pick_rows(rows, 3, seed=7)
    levels = [(r["distortion"], r["level"]) for r in picked]
    assert levels == [(k, lv) for k in ("blur", "noise") for lv in (1, 2) for _ in range(3)]
    assert len({r["id"] for r in picked}) == 12  # no row twice
    assert picked == level_reads.pick_rows(rows, 3, seed=7)
    assert len(level_reads.pick_rows(rows, 9, seed=7)) == 20  # fewer rows than asked: all

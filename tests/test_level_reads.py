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
    mos = {"jpeg": [4.338, 4.246, 3.866, 1.945, 1.35], "blur": [4.612, 4.382, 2.911, 1.873, 1.303]}
    stats = level_reads.group_stats(truths, reads, mos)
    j2 = stats[("jpeg", 2)]
    assert (j2["images"], j2["answers"], j2["right"], j2["mixed"], j2["any_right"],
            j2["unread"]) == (2, 8, 2, 1, 1, 1)
    s = level_reads.shares(j2)
    assert (s["right"], s["mixed"], s["any_right"]) == (0.25, 0.5, 0.5)
    # 7 readable answers: jpeg 3 once (|3.866 - 4.246| = 0.380), jpeg 1 four times (0.092 each)
    assert s["mos_gap"] == pytest.approx((0.380 + 4 * 0.092) / 7)
    assert level_reads.shares(stats[("blur", 1)]) == {"right": 1.0, "mixed": 0.0,
                                                      "any_right": 1.0, "mos_gap": 0.0}
    with pytest.raises(ValueError):  # one group per image, or the counts would be silently off
        level_reads.group_stats(truths, reads[:2], mos)


def test_pick_rows_takes_per_level_rows_of_every_level_reproducibly(level_reads):
    rows = [{"id": f"{k}{lv}_{i}", "distortion": k, "level": lv}
            for k in ("blur", "noise") for lv in (1, 2) for i in range(5)]
    picked = level_reads.pick_rows(rows, 3, seed=7)
    levels = [(r["distortion"], r["level"]) for r in picked]
    assert levels == [(k, lv) for k in ("blur", "noise") for lv in (1, 2) for _ in range(3)]
    assert len({r["id"] for r in picked}) == 12  # no row twice
    assert picked == level_reads.pick_rows(rows, 3, seed=7)
    assert len(level_reads.pick_rows(rows, 9, seed=7)) == 20  # fewer rows than asked: all

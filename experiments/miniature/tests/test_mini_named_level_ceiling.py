"""named_level_ceiling.py: the per-named-level re-mappings of a report's answers, checked
against scipy on a hand-built report whose reasoning is written with the teacher's own phrases."""

from __future__ import annotations

import importlib
import json
import random

import pytest
from scipy.stats import spearmanr
from synth import LEVEL_MOS
from synthetic_teacher import describe


@pytest.fixture(scope="module")
def ceiling():
    return importlib.import_module("named_level_ceiling")


def _row(view: str, true: tuple[str, int], named: tuple[str, int] | None, written: float,
         expected: float | None = None) -> dict:
    reasoning = describe(*named, random.Random(0)) if named else "I cannot tell."
    row = {"id": f"{view}_{true[0]}_{true[1]}", "mos": LEVEL_MOS[true[0]][true[1] - 1],
           "reasoning": reasoning, "score": written if expected is None else expected}
    if expected is not None:  # `--readout expected`: score is the read-out, the written answer
        row["written_score"] = written  # stays beside it
    return row


def test_remapped_by_hand_against_scipy(ceiling):
    rows = [_row("a", ("blur", 1), ("blur", 1), 3.0, expected=4.4),
            _row("b", ("jpeg", 4), ("jpeg", 4), 3.1),
            _row("c", ("noise", 1), ("jpeg", 3), 2.9),   # a misread: names JPEG 3 (MOS 3.866)
            _row("d", ("jpeg", 3), ("jpeg", 3), 2.8),
            _row("e", ("noise", 5), None, 1.5)]          # unreadable: keeps its answer
    mos = [r["mos"] for r in rows]
    got = ceiling.remapped(rows)
    assert got["n"] == 5 and got["right"] == pytest.approx(3 / 5)
    # the written answers, not the expected read-out that `score` holds for row a
    assert got["written"] == pytest.approx(spearmanr([3.0, 3.1, 2.9, 2.8, 1.5], mos)[0])
    # named MOS: c and d both name JPEG 3 (3.866); c's written 2.9 > d's 2.8 breaks the tie
    named = [4.612, 1.945, 3.866 + 0.0029, 3.866 + 0.0028, 1.5]
    assert got["named_mos"] == pytest.approx(spearmanr(named, mos)[0])
    # hindsight: JPEG 3's value is the mean MOS of the views naming it, (3.893 + 3.866) / 2
    hind = [4.612, 1.945, (3.893 + 3.866) / 2 + 0.0029, (3.893 + 3.866) / 2 + 0.0028, 1.5]
    assert got["hindsight"] == pytest.approx(spearmanr(hind, mos)[0])
    assert got["named_mos"] != got["written"]  # the example tells the three apart
    # lean: c names the wrong distortion and e nothing, so only a, b, d count, each named its own
    # level: 0 for blur and JPEG, and noise has no view left
    assert got["lean"] == {"blur": 0.0, "jpeg": 0.0}


def test_lean_by_hand(ceiling):
    """Named JPEG 4 for a JPEG 3 view (1.945 - 3.866), JPEG 3 for JPEG 3 (0), noise 2 for noise 1
    (3.390 - 3.893), blur for noise and a view with no true level (both left out)."""
    got = ceiling.lean([(("jpeg", 4), ("jpeg", 3)), (("jpeg", 3), ("jpeg", 3)),
                        (("noise", 2), ("noise", 1)), (("blur", 1), ("noise", 5)),
                        (None, ("blur", 2)), (("blur", 3), None)])
    assert got == pytest.approx({"jpeg": (LEVEL_MOS["jpeg"][3] - LEVEL_MOS["jpeg"][2]) / 2,
                                 "noise": LEVEL_MOS["noise"][1] - LEVEL_MOS["noise"][0]})
    assert got["jpeg"] == pytest.approx((1.945 - 3.866) / 2, abs=1e-3)


def test_main_reads_a_run_folder_and_names_a_missing_report(ceiling, tmp_path, capsys):
    run = tmp_path / "r"
    (run / "eval").mkdir(parents=True)
    rows = [_row(v, (k, lv), (k, lv), LEVEL_MOS[k][lv - 1]) for v in "ab"
            for k in ("blur", "jpeg") for lv in (1, 4)]
    for name in ("sft_reason.json", "sft_reason_held_out_views.json"):
        (run / "eval" / name).write_text(json.dumps({"samples": rows}))
    assert ceiling.main([str(run), str(tmp_path / "missing")]) == 0
    out, err = capsys.readouterr()
    assert "missing: no eval/sft_reason.json" in err
    # a student that names every level right and writes its MOS: every bound is 1 - (1 + 0.03)
    assert "RESULT named_level_ceiling_centre -0.0300 goal 0.0" in out
    assert "| r | all (8) | SFT | 1.000 | 1.000 | 1.000 | 100% | blur +0.00 jpeg +0.00 |" in out

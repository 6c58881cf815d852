"""The synthetic teacher (distill_synthetic.py): what it writes, how noisy it is, and that it
runs behind the product's `Teacher` interface, files and filtering as a real teacher."""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from distill_synthetic import main as distill_synthetic
from PIL import Image
from synth import write_set
from synthetic_teacher import (
    COMPRESSION,
    NOISE,
    SHARPNESS,
    SyntheticTeacher,
    describe,
    parse_bias,
    quality_word,
    read_level,
)

from qponder_mlx.distill import DistillConfig, run_distill, teacher_prompt
from qponder_mlx.io import read_jsonl
from qponder_mlx.labels import Sample
from qponder_mlx.prompts import parse_response

# KADID-10k mean MOS per level, copied from ../shared/data/kadid_level_mos.json (an independent
# copy: the teacher reads synth's table).
KADID = {"blur": [4.612, 4.382, 2.911, 1.873, 1.303],
         "noise": [3.893, 3.39, 3.045, 2.71, 2.301],
         "jpeg": [4.338, 4.246, 3.866, 1.945, 1.35]}
BLIND = teacher_prompt("blind")
# The coarse teacher's bins, written out by hand: KADID level -> the levels it cannot tell apart.
HAND_BINS = {1: (1, 2), 2: (1, 2), 3: (3,), 4: (4, 5), 5: (4, 5)}


def _refs(n: int) -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    return {f"ref{i}": Image.fromarray((rng.random((24, 24, 3)) * 255).astype("uint8"))
            for i in range(n)}


@pytest.fixture
def synth_set(tmp_path) -> Path:
    write_set(tmp_path / "set", _refs(2))  # 2 photos x 3 types x 5 levels = 30 images
    return tmp_path / "set"


def _sample(distortion: str, level: int, i: int = 0) -> Sample:
    return Sample(id=f"x{i}_{distortion}_{level}", image=Path(f"/nowhere/x{i}.png"),
                  mos=KADID[distortion][level - 1])


def test_temperature_zero_answers_the_kadid_level_mos_in_the_student_format():
    t = SyntheticTeacher(temperature=0)
    for kind, table in KADID.items():
        for level, mos in enumerate(table, start=1):
            s = _sample(kind, level)
            reply = t.ask((kind, level), s, BLIND)
            p = parse_response(reply.text)
            assert p.format_ok and p.score == pytest.approx(mos, abs=0.005)
            assert len(p.reasoning.split()) >= 15
            assert quality_word(mos) in p.reasoning  # the overall verdict matches the score


def test_reasoning_describes_the_known_distortion_in_its_own_dimension_only():
    rng = __import__("random").Random(0)
    for level in range(1, 6):
        text = describe("noise", level, rng)
        assert any(s in text for s in NOISE["noise"][level - 1])
        assert any(s in text for s in SHARPNESS["clean"])  # not blurred ...
        assert any(s in text for s in COMPRESSION["clean"])  # ... not compressed
    severe, mild = describe("jpeg", 5, rng), describe("jpeg", 1, rng)
    assert not any(s in mild for s in COMPRESSION["jpeg"][4])
    assert any(s in severe for s in COMPRESSION["jpeg"][4])
    with pytest.raises(ValueError, match="unknown distortion"):
        describe("contrast", 2, rng)


def test_read_level_inverts_describe_for_every_phrasing():
    rng = __import__("random").Random(1)
    for kind in KADID:
        for level in range(1, 6):
            for _ in range(40):  # 3 phrasings per dimension: every combination shows up
                assert read_level(describe(kind, level, rng)) == (kind, level)
    # a blur-1 image is described as clean in every dimension: that reads as blur 1
    assert read_level(" ".join(p[0] for p in (SHARPNESS["clean"], NOISE["clean"],
                                              COMPRESSION["clean"]))) == ("blur", 1)
    assert read_level("Edges are crisp. The image is dominated by noise.") == ("noise", 5)
    assert read_level("no known phrase here") is None


def test_wording_varies_between_images_of_the_same_level():
    t = SyntheticTeacher(temperature=0)
    texts = {parse_response(t.ask(("blur", 4), _sample("blur", 4, i), BLIND).text).reasoning
             for i in range(30)}
    # 3 phrasings per dimension and 3 overall sentences: a single template would give 1.
    assert len(texts) >= 8


def test_noise_and_misreads_match_the_configured_rates():
    t = SyntheticTeacher(temperature=1.0)  # SD 0.35, 15 % misread levels
    errors, misread = [], 0
    n = 3000
    for i in range(n):
        s = _sample("noise", 3, i)  # neighbours 2 and 4 are 0.35 / 0.34 away
        reply = t.ask(("noise", 3), s, BLIND)
        text = parse_response(reply.text).reasoning
        if not any(p in text for p in NOISE["noise"][2]):
            misread += 1  # described as level 2 or 4
        else:
            errors.append(parse_response(reply.text).score - s.mos)
    assert misread / n == pytest.approx(0.15, abs=0.025)
    assert statistics.fmean(errors) == pytest.approx(0.0, abs=0.03)
    assert statistics.pstdev(errors) == pytest.approx(0.35, rel=0.1)


def test_answers_are_seeded_per_sample_and_attempt():
    a, b = SyntheticTeacher(temperature=1.0), SyntheticTeacher(temperature=1.0)
    s = _sample("jpeg", 3)
    first = [a.ask(("jpeg", 3), s, BLIND).text for _ in range(4)]
    assert first == [b.ask(("jpeg", 3), s, BLIND).text for _ in range(4)]  # reproducible
    assert len(set(first)) > 1  # but attempts differ, so samples_per_image > 1 means something
    assert SyntheticTeacher(temperature=1.0, seed=1).ask(("jpeg", 3), s, BLIND).text != first[0]


def test_guided_mode_centres_on_the_mos_it_is_shown():
    t = SyntheticTeacher(temperature=0)
    s = Sample(id="g", image=Path("/nowhere/g.png"), mos=3.21)
    reply = t.ask(("blur", 1), s, teacher_prompt("guided", 3.21))
    assert parse_response(reply.text).score == pytest.approx(3.21)


def test_distill_cli_with_the_synthetic_teacher(synth_set):
    out = synth_set.parent / "distill.jsonl"
    assert distill_synthetic(["--data", str(synth_set / "labels.jsonl"), "--out", str(out),
                              "--temperature", "1.0"]) == 0
    kept, rejected = list(read_jsonl(out)), list(read_jsonl(synth_set.parent /
                                                            "distill.rejected.jsonl"))
    assert len(kept) + len(rejected) == 30 and kept
    assert all(r["teacher_model"].startswith("synthetic-") for r in kept + rejected)
    # Blind filtering did its job: every kept score is within 0.5 of the MOS, every rejected
    # one is not.
    assert all(abs(r["teacher_score"] - r["mos"]) <= 0.5 for r in kept)
    assert all(r["code"] == "score_error" for r in rejected)
    assert all(abs(r["teacher_scores"][0] - r["mos"]) > 0.5 for r in rejected)
    # Rows are SFT-ready: the assistant turn parses, the image is the sample's.
    row = kept[0]
    assert parse_response(row["messages"][-1]["content"]).format_ok
    assert Path(row["images"][0]).name.startswith(row["id"])
    summary = json.loads((synth_set.parent / "distill.summary.json").read_text())
    assert summary["teacher_vs_mos"]["srcc"] > 0.8


def test_unknown_images_fail_one_by_one_and_explicit_label_file_is_used(synth_set, tmp_path):
    # A label file without distortion/level: the teacher knows nothing about these images.
    plain = tmp_path / "plain.jsonl"
    rows = [json.loads(line) for line in (synth_set / "labels.jsonl").read_text().splitlines()]
    plain.write_text("".join(json.dumps({"image": str(synth_set / r["image"]), "mos": r["mos"],
                                         "id": f"other{i}"}) + "\n"
                             for i, r in enumerate(rows[:3])))
    samples = [Sample(id=f"other{i}", image=tmp_path / f"nowhere{i}.png", mos=3.0)
               for i in range(3)]
    teacher = SyntheticTeacher()
    cfg = DistillConfig(teacher="local", teacher_model=teacher.model, max_retries=0)
    res = run_distill(samples, teacher, cfg, tmp_path / "d.jsonl", progress=False)
    assert res.new["failed"] == 3  # recorded per sample, the run went on
    bad = list(read_jsonl(tmp_path / "d.rejected.jsonl"))
    assert {r["code"] for r in bad} == {"no_metadata"}

    # Given the synth_iqa.py label file explicitly, ids are looked up there.
    teacher = SyntheticTeacher(synth_set / "labels.jsonl", temperature=0)
    s = Sample(id=rows[7]["id"], image=tmp_path / "elsewhere.png", mos=rows[7]["mos"])
    assert teacher.prepare(s) == (rows[7]["distortion"], rows[7]["level"])
    # ... and the script hands --labels to it. Without it the images' own set answers for them;
    # the label file of another set knows neither their ids nor their paths: each one fails
    assert distill_synthetic(["--data", str(plain), "--out", str(tmp_path / "own.jsonl"),
                              "--temperature", "0"]) == 0
    assert len(list(read_jsonl(tmp_path / "own.jsonl"))) == 3
    other = tmp_path / "other"
    write_set(other, _refs(1))
    assert distill_synthetic(["--data", str(plain), "--out", str(tmp_path / "e.jsonl"),
                              "--labels", str(other / "labels.jsonl")]) == 0
    assert {r["code"] for r in read_jsonl(tmp_path / "e.rejected.jsonl")} == {"no_metadata"}
    assert not list(read_jsonl(tmp_path / "e.jsonl"))


def test_a_missing_label_file_is_one_line_naming_it(synth_set, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"missing.jsonl.*synth_iqa\.py"):
        SyntheticTeacher(tmp_path / "missing.jsonl")
    assert distill_synthetic(["--data", str(synth_set / "labels.jsonl"),
                              "--out", str(tmp_path / "d.jsonl"),
                              "--labels", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing.jsonl" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "d.jsonl").exists()


def test_bias_shifts_blind_answers_per_type_and_guided_ones_not_at_all():
    t = SyntheticTeacher(temperature=0, bias="noise=+0.5, blur=-0.4")
    assert "noise+0.50" in t.model and "blur-0.40" in t.model
    offset = {"noise": 0.5, "blur": -0.4, "jpeg": 0.0}
    for kind, table in KADID.items():
        for level, mos in enumerate(table, start=1):
            p = parse_response(t.ask((kind, level), _sample(kind, level), BLIND).text)
            want = min(5.0, max(1.0, mos + offset[kind]))  # hand: the level's MOS + offset
            assert p.score == pytest.approx(want, abs=0.005), (kind, level)
            assert quality_word(want) in p.reasoning  # the verdict follows the teacher's scale
    s = Sample(id="g", image=Path("/nowhere/g.png"), mos=3.21)
    assert parse_response(t.ask(("noise", 2), s, teacher_prompt("guided", 3.21)).text).score \
        == pytest.approx(3.21)


@pytest.mark.parametrize("text", ["speckle=+0.3", "noise", "noise=lots", "noise=0.1,noise=0.2",
                                  "blur=-9"])
def test_bad_bias_is_one_line_naming_the_field(text, synth_set, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--bias: bad entry .*TYPE=OFFSET"):
        parse_bias(text)
    assert distill_synthetic(["--data", str(synth_set / "labels.jsonl"),
                              "--out", str(tmp_path / "d.jsonl"), "--bias", text]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --bias: bad entry") and len(err.splitlines()) == 1
    assert not (tmp_path / "d.jsonl").exists()


def test_bias_reaches_the_rows(synth_set, tmp_path):
    assert parse_bias("") == {} and parse_bias("jpeg=0.25,") == {"jpeg": 0.25}
    out = tmp_path / "biased.jsonl"
    assert distill_synthetic(["--data", str(synth_set / "labels.jsonl"), "--out", str(out),
                              "--temperature", "0", "--bias", "noise=+0.3,blur=-0.3"]) == 0
    rows = list(read_jsonl(out))
    assert len(rows) == 30  # 0.3 off passes the 0.5 filter
    kinds = {json.loads(line)["id"]: json.loads(line)["distortion"]
             for line in (synth_set / "labels.jsonl").read_text().splitlines()}
    for kind, offset in {"noise": 0.3, "blur": -0.3, "jpeg": 0.0}.items():
        errors = [r["teacher_score"] - r["mos"] for r in rows if kinds[r["id"]] == kind]
        # the answers are written with 2 decimals, the MOS has 3
        assert len(errors) == 10 and errors == pytest.approx([offset] * 10, abs=0.0051), kind


def test_coarse_teacher_scores_each_bin_at_its_mean_and_describes_one_of_its_levels():
    t = SyntheticTeacher(temperature=0, coarse=True)
    assert t.model.endswith(",coarse)")
    for kind, table in KADID.items():
        for level in range(1, 6):
            b = HAND_BINS[level]
            want = round(sum(table[v - 1] for v in b) / len(b), 2)  # hand: the bin's mean MOS
            described = set()
            for k in range(12):  # repeated asks: new draws of the described level
                p = parse_response(t.ask((kind, level), _sample(kind, level, k), BLIND).text)
                assert p.score == pytest.approx(want, abs=0.005), (kind, level)
                described.add(read_level(p.reasoning))
            assert {lv for _, lv in described} <= set(b), (kind, level, described)
            assert {k for k, _ in described} == {kind} and len(described) == len(b)
    # guided prompts show the MOS, which the coarse teacher follows like the fine one
    s = Sample(id="g", image=Path("/nowhere/g.png"), mos=3.21)
    assert parse_response(t.ask(("noise", 2), s, teacher_prompt("guided", 3.21)).text).score \
        == pytest.approx(3.21)


def test_fine_teacher_answers_are_as_before_the_coarse_option():
    """The option draws nothing when off, so the recipes measured before it distil the same rows:
    60 blind answers (some misread, one type biased) hash as the teacher of commit c54e09a wrote
    them (the hash was taken by running that commit's module on these samples)."""
    t = SyntheticTeacher(temperature=0.7, bias="noise=+0.5")
    texts = [t.ask((kind, level), _sample(kind, level, i), BLIND).text
             for kind in KADID for level in range(1, 6) for i in range(4)]
    assert hashlib.sha256("\n".join(texts).encode()).hexdigest() == \
        "f1eab19de23424438c8ba5834ea7f54e36a21c9ec4f19e6e38de45bfb61d6182"


def test_coarse_reaches_the_rows(synth_set, tmp_path):
    out = tmp_path / "coarse.jsonl"
    assert distill_synthetic(["--data", str(synth_set / "labels.jsonl"), "--out", str(out),
                              "--temperature", "0", "--coarse"]) == 0
    facts = {json.loads(line)["id"]: json.loads(line)
             for line in (synth_set / "labels.jsonl").read_text().splitlines()}
    rows = list(read_jsonl(out))
    assert len(rows) == 30 and all(r["teacher_model"].endswith(",coarse)") for r in rows)
    for r in rows:  # levels 1 and 2 (and 4 and 5) get one score: the pair's mean MOS, by hand
        f = facts[r["id"]]
        pair = HAND_BINS[f["level"]]
        want = sum(KADID[f["distortion"]][v - 1] for v in pair) / len(pair)
        assert r["teacher_score"] == pytest.approx(want, abs=0.0051), r["id"]

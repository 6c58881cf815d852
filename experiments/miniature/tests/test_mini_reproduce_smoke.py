"""reproduce.py at toy scale: every stage runs through our commands, every artefact appears,
the table's numbers are the eval reports' numbers, and a rerun resumes instead of redoing work.

Whether the miniature reproduction *learns* is the bench's business (docs/reproduction.md), not
this test's: two SFT steps and one GRPO step teach a random model nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

from qponder_mlx.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]

PIPELINE = """
sft_config = "sft.toml"
grpo_config = "grpo.toml"
sft_set = ["iters=3"]   # on top of sft.toml's iters = 2
[data]
size = 56
photos = "astronaut,camera,coffee"
test_photos = "coffee"
crops = 1
test_crops = 1
[student]
hidden_size = 64
vision_hidden = 320
vision_depth = 3
vision_stem = "dct"
whiten = true        # whiten_stem.py over the train images
[distill]
samples_per_image = 1
views = 1            # cold start on the centre views only; GRPO on every view
photos = "astronaut" # ... of one of the two train photos
bias = "noise=+0.3"  # a miscalibrated teacher reaches distill_synthetic.py
[eval]
batch_size = 16
max_tokens = 8
"""
SFT = """
iters = 2
batch_size = 2
warmup = 0
steps_per_save = 2
[lora]
rank = 4
target_modules = ["q_proj", "v_proj", "lm_head"]
train_vision = true
"""
GRPO = """
iters = 1
batch_size = 1
group_size = 2
beta = 0.0
max_completion_length = 8
average_every = 1   # adapters = the mean of the (one) step: the last-step rows get scored too
[rewards]
consistency_weight = 0.5
"""


def _toy_conf(tmp_path: Path) -> Path:
    """The toy pipeline's three TOMLs in tmp_path/conf."""
    conf = tmp_path / "conf"
    conf.mkdir()
    for name, text in (("pipeline.toml", PIPELINE), ("sft.toml", SFT), ("grpo.toml", GRPO)):
        (conf / name).write_text(text)
    return conf


@pytest.fixture(scope="module")
def reproduce():
    return importlib.import_module("reproduce")


def test_toy_pipeline_writes_every_artefact_and_resumes(reproduce, tmp_path, capsys):
    conf = _toy_conf(tmp_path)
    out = tmp_path / "repro"
    argv = ["--out", str(out), "--config", str(conf / "pipeline.toml"), "--in-process"]
    assert reproduce.main(argv) == 0
    printed = capsys.readouterr().out

    # The student base, both adapters, the GRPO curves, the four eval reports, the pictures.
    for path in ["student_base/config.json", "distill/train.jsonl",
                 "sft/adapters/adapters.safetensors", "grpo/adapters/adapters.safetensors",
                 "grpo/metrics.jsonl", "grpo/curves.html",
                 "eval/sft_reason.json", "eval/sft_fast.json", "eval/grpo_reason.json",
                 "eval/grpo_fast.json", "eval/sft_reason_train_photos.json",
                 "eval/grpo_reason_train_photos.json", "figures/repro_grpo_rewards.svg",
                 "results.md", "commands.sh", "logs/sft.log"]:
        assert (out / path).exists(), path
    assert "<polyline" in (out / "figures" / "repro_grpo_rewards.svg").read_text() or \
        "<circle" in (out / "figures" / "repro_grpo_rewards.svg").read_text()
    commands = (out / "commands.sh").read_text()
    synth_iqa, whiten, distill, train_grpo = (f"python {ROOT / s} " for s in (
        "synth_iqa.py", "whiten_stem.py", "distill_synthetic.py", "train_grpo.py"))
    for cmd in [synth_iqa, distill, "qponder train --stage sft", train_grpo, "qponder eval",
                "--mode fast", "--mode reason", "--no-progress --seed 0"]:
        assert cmd in commands, cmd
    # the product's commands for what the product has; the miniature's own scripts otherwise
    assert "qponder dev" not in commands and "qponder distill" not in commands
    assert "qponder train --stage grpo" not in commands

    # The student's image tokens were whitened over the 60 train images (2 photos x 2 views x
    # 15), before anything trained on it
    assert json.loads((out / "student_base" / "whitening.json").read_text())["images"] == 60
    assert commands.index(synth_iqa) < commands.index(whiten) < commands.index(distill) \
        < commands.index("qponder train --stage sft") < commands.index(train_grpo) \
        < commands.index("qponder eval")

    # Cold-start subset: the teacher saw only astronaut's own view (15 images), GRPO every view of
    # both train photos (+ 1 crop each: 60 rows).
    cold = [json.loads(x) for x in (out / "data" / "cold_start.jsonl").open()]
    assert len(cold) == 15 and all(r["view"] == r["reference"] == "astronaut" for r in cold)
    assert json.loads((out / "distill" / "train.summary.json").read_text())["total"] == 15
    assert distill + "--data " + str(out / "data" / "cold_start.jsonl") in commands
    assert "--bias noise=+0.3" in commands
    assert all("noise+0.30" in r["teacher_model"] for r in read_jsonl(out / "distill" /
                                                                       "train.jsonl"))
    assert "--data " + str(out / "data" / "train.jsonl") in commands.split(train_grpo)[1]
    # GRPO's done-marker, written last by train_grpo.py: one averaged step, its last weights kept
    marker = json.loads((out / "grpo" / "miniature.json").read_text())
    assert marker["averaged_steps"] == 1 and marker["adapters_last"].endswith("adapters_last")
    # sft_set reaches the trainer as --set flags, over the train TOML
    assert json.loads((out / "sft" / "summary.json").read_text())["steps"] == 3

    # The table's fast-mode SRCC is scipy's Spearman of the eval report's scores vs MOS, pooled
    # and per distortion type (one test photo x 5 levels each).
    results = json.loads((out / "results.json").read_text())
    test = [json.loads(line) for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    report = json.loads((out / "eval" / "sft_fast.json").read_text())
    score = {r["id"]: r["score"] for r in report["samples"]}
    row = results["rows"]["Q-Ponder-CI (SFT), fast"]["agreement"]
    pred, mos = [score[t["id"]] for t in test], [t["mos"] for t in test]
    assert row["pooled"]["n"] == 15
    sft_fast = results["rows"]["Q-Ponder-CI (SFT), fast"]
    assert sft_fast["mae"] == pytest.approx(
        sum(abs(p - m) for p, m in zip(pred, mos)) / len(mos), abs=1e-4)
    assert sft_fast["distinct_answers"] == len(set(pred))
    assert row["pooled"]["srcc"] == pytest.approx(stats.spearmanr(pred, mos)[0], abs=1e-4)
    blur = [i for i, t in enumerate(test) if t["distortion"] == "blur"]
    assert row["blur"]["n"] == 5
    assert row["blur"]["srcc"] == pytest.approx(
        stats.spearmanr([pred[i] for i in blur], [mos[i] for i in blur])[0], abs=1e-4)
    # Classic metrics: computed (lower-is-better negated) or skipped with a reason.
    for name in ("BRISQUE", "PIQE"):
        r = results["rows"][name]
        assert "skipped" in r or r["agreement"]["pooled"]["n"] == 15
    assert results["grpo_steps"] == 1
    seen = results["rows"]["Q-Ponder (GRPO), reason, train photos"]
    # "seen" = the centre views of the 2 train photos (not their crops): 2 x 15 images
    assert seen["photos"] == "seen" and seen["agreement"]["pooled"]["n"] <= 30
    seen_report = json.loads((out / "eval" / "grpo_reason_train_photos.json").read_text())
    assert seen_report["n_labels"] == 30
    seen_ids = {json.loads(x)["id"] for x in (out / "data" / "train_photos.jsonl").open()}
    assert len(seen_ids) == 30 and not any("_crop" in i for i in seen_ids)
    # all views of the held-out photo (centre + 1 crop): its own student and classic rows
    views = [json.loads(x) for x in (out / "data" / "held_out_views.jsonl").open()]
    assert len(views) == 30 and {r["reference"] for r in views} == {"coffee"}
    assert {r["id"] for r in test} < {r["id"] for r in views}
    for name in ("Q-Ponder (GRPO), reason, all views", "Q-Ponder-CI (SFT), fast, all views",
                 "BRISQUE, all views"):
        r = results["rows"][name]
        assert r["photos"] == "held-out, all views"
        assert "skipped" in r or r["agreement"]["pooled"]["n"] <= 30
    for measure in ("repro_grpo_srcc", "repro_grpo_minus_sft_srcc",
                    "repro_grpo_minus_brisque_srcc"):
        for suffix in ("", "_all_views", "_expected_readout", "_all_views_expected_readout"):
            assert f"RESULT {measure}{suffix} " in printed
    # reason-mode evals read both ways in one decode: a row per read-out, fast mode one row
    assert commands.count("--readout expected") == 8 and "--mode fast --readout" not in commands
    # average_every: GRPO's last-step weights are scored beside the mean, from adapters_last/;
    # with one step averaged the two are the same weights, so the same answers
    last = json.loads((out / "eval" / "grpo_last_reason.json").read_text())
    assert last["adapter"].endswith("adapters_last")
    grpo = json.loads((out / "eval" / "grpo_reason.json").read_text())
    assert [r["text"] for r in last["samples"]] == [r["text"] for r in grpo["samples"]]
    assert results["rows"]["Q-Ponder (GRPO, last step), reason, all views"]["photos"] == \
        "held-out, all views"
    for name in ("Q-Ponder (GRPO), reason, expected read-out",
                 "Q-Ponder-CI (SFT), reason, expected read-out, all views"):
        assert name in results["rows"]
    assert "Q-Ponder (GRPO), fast, expected read-out" not in results["rows"]

    # A rerun finds every stage done: no command runs again, the table is rebuilt.
    assert reproduce.main(argv) == 0
    again = capsys.readouterr().out
    assert "done earlier" in again and "$ qponder" not in again and "$ python" not in again
    assert (out / "commands.sh").read_text() == commands
    # A stage redone from scratch (its output deleted, as GRPO-only variants do) records its
    # own time, not the sum with the stale one
    timings = json.loads((out / "timings.json").read_text())
    (out / "timings.json").write_text(json.dumps({**timings, "grpo_fast": 1e6}))
    (out / "eval" / "grpo_fast.json").unlink()
    assert reproduce.main(argv) == 0
    assert "[grpo_fast]" in capsys.readouterr().out
    redone = json.loads((out / "timings.json").read_text())
    assert 0 < redone["grpo_fast"] < 1e5 and redone["sft"] == timings["sft"]


def test_scripts_run_as_files_from_anywhere(tmp_path):
    """The smoke test above runs each script's main() in process; a real run starts them as
    `python <script>` (Runner's default), from any folder: each must import beside itself and
    exit through main. `--help` stops after the imports; the four start at once (~5 s)."""
    scripts = ["synth_iqa.py", "whiten_stem.py", "distill_synthetic.py", "train_grpo.py"]
    procs = [subprocess.Popen([sys.executable, str(ROOT / s), "--help"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for s in scripts]
    for script, p in zip(scripts, procs):
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and f"usage: {script}" in out, (script, out[-2000:])


def test_report_scores_reads_the_written_or_the_expected_answer(reproduce):
    samples = [{"id": "a", "score": 3.417, "written_score": 3.37},
               {"id": "b", "score": None, "written_score": None}]
    new = {"readout": "expected", "samples": samples}
    assert reproduce.report_scores(new, "text") == {"a": 3.37, "b": None}
    assert reproduce.report_scores(new, "expected") == {"a": 3.417, "b": None}
    old = {"samples": [{"id": "a", "score": 3.37}]}  # written before the option existed
    assert reproduce.report_scores(old, "text") == {"a": 3.37}
    assert reproduce.report_scores(old, "expected") == {}
    assert reproduce.eval_scores(new, ["b", "a", "c"], "expected") == [None, 3.417, None]
    assert reproduce.expected_row("X, reason, all views") == \
        "X, reason, expected read-out, all views"


def test_pipeline_base_fills_what_the_variant_leaves_out(reproduce, tmp_path):
    (tmp_path / "main.toml").write_text(
        'grpo_set = ["iters=60"]\n[data]\ncrops = 16\ntest_crops = 8\n'
        '[student]\nhidden_size = 128\n')
    (tmp_path / "v.toml").write_text(
        'base = "main.toml"\n[student]\nhidden_size = 256\n[distill]\nviews = 5\n')
    cfg = reproduce.load_pipeline(tmp_path / "v.toml")
    assert (cfg.student.hidden_size, cfg.distill.views) == (256, 5)       # the variant's
    assert (cfg.data.crops, cfg.data.test_crops, cfg.grpo_set) == (16, 8, ["iters=60"])  # base's
    assert cfg.student.num_layers == 2                                    # neither: defaults
    # a base naming a base: each layer fills what the files above it leave out
    (tmp_path / "w.toml").write_text('base = "v.toml"\n[data]\ncrops = 4\n')
    w = reproduce.load_pipeline(tmp_path / "w.toml")
    assert (w.data.crops, w.data.test_crops, w.student.hidden_size, w.distill.views,
            w.grpo_set, w.base) == (4, 8, 256, 5, ["iters=60"], "v.toml")
    (tmp_path / "main.toml").write_text('base = "w.toml"\n')  # main -> w -> v -> main
    with pytest.raises(reproduce.ConfigError, match=r"main.toml: base w.toml leads back to itself "
                       r"\(w.toml -> v.toml -> main.toml -> w.toml\)"):
        reproduce.load_pipeline(tmp_path / "w.toml")
    # the shipped recipe and its variants (configs/): each variant holds only what it changes
    conf = ROOT / "configs"
    main = reproduce.load_pipeline(conf / "pipeline.toml")
    assert (main.student.hidden_size, main.student.whiten, main.sft_set, main.grpo_set) == (
        256, True, ["iters=1500"], ["iters=60", "average_every=10", "train_decimals=false"])
    # History AX: the shipped recipe with a miscalibrated teacher, nothing else changed
    biased = reproduce.load_pipeline(conf / "biased_teacher.toml")
    assert biased.distill.bias and biased.distill != main.distill
    assert dataclasses.replace(biased, base="", distill=main.distill) == main
    # CB (128 images per GRPO step) and CD (CB for 30 steps): AX's teacher, another GRPO
    b128, b128_30 = (reproduce.load_pipeline(conf / f"biased_teacher_b128{v}.toml")
                     for v in ("", "_30steps"))
    for cfg in (b128, b128_30):
        assert cfg.distill == biased.distill and cfg.grpo_set != biased.grpo_set
        assert dataclasses.replace(cfg, base="", distill=main.distill,
                                   grpo_set=main.grpo_set) == main
    assert [x for x in b128_30.grpo_set if x != "iters=30"] == \
        [x for x in b128.grpo_set if x != "iters=20"] and "iters=30" in b128_30.grpo_set
    # CF: the shipped recipe with fast-mode answers in its cold start, nothing else changed
    fast = reproduce.load_pipeline(conf / "fast_answers.toml")
    assert fast.sft_set == ["iters=1500", "fast_share=0.25"]
    assert dataclasses.replace(fast, base="", sft_set=main.sft_set) == main
    # CH: whole-level fast rows written on the distill side, nothing else changed
    levels = reproduce.load_pipeline(conf / "fast_levels.toml")
    assert levels.distill.fast_level_share == 0.10
    assert dataclasses.replace(levels, base="", distill=main.distill) == main
    assert sorted(p.name for p in conf.glob("*.toml")) == [
        "biased_teacher.toml", "biased_teacher_b128.toml", "biased_teacher_b128_30steps.toml",
        "fast_answers.toml", "fast_levels.toml", "grpo.toml", "pipeline.toml", "sft.toml"]
    # every recipe's --set flags are settings the trainers know, over the train TOMLs they name
    from train_grpo import MiniatureGRPOConfig

    from qponder_mlx.train.config import SFTConfig, load_config, parse_set_flags

    for cfg in (main, biased, b128, b128_30):
        sft = load_config(SFTConfig, conf / cfg.sft_config, parse_set_flags(cfg.sft_set))
        grpo = load_config(MiniatureGRPOConfig, conf / cfg.grpo_config,
                           parse_set_flags(cfg.grpo_set))
        assert sft.iters == 1500 and grpo.average_every in (5, 10)
    assert (grpo.iters, grpo.batch_size, grpo.train_decimals, grpo.judge_decimals,
            grpo.rewards.consistency_weight) == (30, 128, True, False, 0.0)


def test_shuffled_mos_rows_permute_the_labels_only(reproduce):
    rows = [{"id": f"im{i}", "mos": float(i), "distortion": "blur"} for i in range(50)]
    out = reproduce.shuffled_mos_rows(rows, seed=3)
    assert [r["id"] for r in out] == [r["id"] for r in rows]  # images and order kept
    assert sorted(r["mos"] for r in out) == [r["mos"] for r in rows]  # the same labels...
    assert sum(r["mos"] != float(i) for i, r in enumerate(out)) > 40  # ...on other images
    assert out == reproduce.shuffled_mos_rows(rows, seed=3)  # seeded
    assert out != reproduce.shuffled_mos_rows(rows, seed=4)
    assert rows[7]["mos"] == 7.0  # the input is not modified


def test_cold_start_rows_picks_views_and_photos_and_names_a_bad_photo(reproduce):
    rows = [{"reference": p, "view": v} for p in ("astronaut", "camera")
            for v in (p, f"{p}_crop0", f"{p}_crop1")]
    pick = reproduce.cold_start_rows
    assert pick(rows) == rows
    assert [r["view"] for r in pick(rows, views=2)] == [
        "astronaut", "astronaut_crop0", "camera", "camera_crop0"]
    assert [r["view"] for r in pick(rows, photos=" camera ,")] == [
        "camera", "camera_crop0", "camera_crop1"]
    assert [r["view"] for r in pick(iter(rows), views=1, photos="camera")] == ["camera"]
    with pytest.raises(reproduce.ConfigError, match=r"\[distill\] photos: coffee is no train photo"
                       r" of data/train.jsonl"):
        pick(rows, photos="camera,coffee", where="data/train.jsonl")


def test_sft_only_stops_after_sft_and_fast_readout_reads_both_ways(reproduce, tmp_path, capsys):
    """`--sft-only` trains and scores the SFT student only; fast_readout.py's leading-digit read
    is the product's fast mode (the eval report's scores), its decimal read higher."""
    conf = _toy_conf(tmp_path)
    out = tmp_path / "repro"
    argv = ["--out", str(out), "--config", str(conf / "pipeline.toml"), "--in-process",
            "--sft-only"]
    assert reproduce.main(argv) == 0
    assert not (out / "grpo").exists() and not (out / "results.json").exists()
    rows = json.loads((out / "sft_results.json").read_text())["rows"]
    assert set(rows) == {"Q-Ponder-CI (SFT), reason", "Q-Ponder-CI (SFT), fast",
                         "Q-Ponder-CI (SFT), reason, expected read-out",
                         *(f"{n}{reproduce.ALL_VIEWS}" for n in (
                             "Q-Ponder-CI (SFT), reason", "Q-Ponder-CI (SFT), fast",
                             "Q-Ponder-CI (SFT), reason, expected read-out"))}

    fast_readout = importlib.import_module("fast_readout")
    reads = fast_readout.fast_reads(out, "test", 56)
    report = json.loads((out / "eval" / "sft_fast.json").read_text())
    ids = [r["id"] for r in read_jsonl(out / "data" / "test.jsonl")]
    assert reproduce.eval_scores(report, ids) == pytest.approx(reads["lead"], abs=1e-3)
    assert all(d > lead for d, lead in zip(reads["decimal"], reads["lead"]))
    assert fast_readout.main([str(out)]) == 0
    assert "fast decimal" in capsys.readouterr().out
    assert set(json.loads((out / "eval" / "fast_readout.json").read_text())) == {
        "test", "held_out_views"}


def test_fast_level_rows_copy_a_share_as_whole_levels(reproduce):
    """The chosen rows come back once more, answered with the rounded teacher score and no
    reasoning; 2.5 rounds up, the level stays in 1..5; the others are untouched."""
    from qponder_mlx.train.fast_answers import chosen

    def row(i, score):
        return {"id": f"r{i}", "teacher_score": score, "messages": [
            {"role": "user", "content": "rate"},
            {"role": "assistant", "content": f"<think>x</think><answer>{score}</answer>"}]}

    rows = [row(i, s) for i, s in enumerate([2.5, 3.49, 4.96, 1.02] * 25)]
    out = reproduce.fast_level_rows(rows, 0.3, seed=1)
    assert out[:100] == rows
    picked = [r for r in rows if chosen(r["id"], 0.3, 1)]
    assert len(out) - 100 == len(picked) and 10 < len(picked) < 50
    for r, copy in zip(picked, out[100:]):
        level = {2.5: 3, 3.49: 3, 4.96: 5, 1.02: 1}[r["teacher_score"]]
        assert copy["id"] == r["id"] + "#fast" and copy["messages"][0] == r["messages"][0]
        assert copy["messages"][-1]["content"] == f"<think></think><answer>{level}</answer>"

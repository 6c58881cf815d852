"""bench/reproduce.py at toy scale: every stage runs through our commands, every artefact appears,
the table's numbers are the eval reports' numbers, and a rerun resumes instead of redoing work.

Whether the miniature reproduction *learns* is the bench's business (docs/reproduction.md), not
this test's: two SFT steps and one GRPO step teach a random model nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
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
whiten = true        # qponder dev whiten-stem over the train images
[distill]
samples_per_image = 1
views = 1            # cold start on the centre views only; GRPO on every view
photos = "astronaut" # ... of one of the two train photos
bias = "noise=+0.3"  # a miscalibrated teacher reaches `qponder distill`
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


@pytest.fixture(scope="module")
def reproduce():
    return importlib.import_module("reproduce")


def test_toy_pipeline_writes_every_artefact_and_resumes(reproduce, tmp_path, capsys):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "pipeline.toml").write_text(PIPELINE)
    (conf / "sft.toml").write_text(SFT)
    (conf / "grpo.toml").write_text(GRPO)
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
    for cmd in ["qponder dev synth-iqa", "qponder distill", "--teacher synthetic",
                "qponder train --stage sft", "qponder train --stage grpo", "--mode fast",
                "--mode reason", "--no-progress --seed 0"]:
        assert cmd in commands

    # The student's image tokens were whitened over the 60 train images (2 photos x 2 views x
    # 15), before anything trained on it
    assert json.loads((out / "student_base" / "whitening.json").read_text())["images"] == 60
    assert commands.index("qponder dev whiten-stem") < commands.index("qponder distill")

    # Cold-start subset: the teacher saw only astronaut's own view (15 images), GRPO every view of
    # both train photos (+ 1 crop each: 60 rows).
    cold = [json.loads(x) for x in (out / "data" / "cold_start.jsonl").open()]
    assert len(cold) == 15 and all(r["view"] == r["reference"] == "astronaut" for r in cold)
    assert json.loads((out / "distill" / "train.summary.json").read_text())["total"] == 15
    assert "distill --data " + str(out / "data" / "cold_start.jsonl") in commands
    assert "--synthetic-bias noise=+0.3" in commands
    assert all("noise+0.30" in r["teacher_model"] for r in read_jsonl(out / "distill" /
                                                                       "train.jsonl"))
    assert "--data " + str(out / "data" / "train.jsonl") in commands.split("--stage grpo")[1]
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
    assert "done earlier" in again and "$ qponder" not in again
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
    # the shipped variants load over the shipped recipe
    bench = ROOT / "bench"
    main, old = (reproduce.load_pipeline(bench / f"repro_pipeline{v}.toml") for v in ("", "_128"))
    cold = reproduce.load_pipeline(bench / "repro_pipeline_cold.toml")
    assert (main.student.hidden_size, old.student.hidden_size, cold.student.hidden_size) == \
        (256, 128, 256)
    assert (main.grpo_set, old.grpo_set, cold.distill.views) == (
        ["iters=60", "average_every=10", "train_decimals=false"], [], 5)
    # the student is whitened since History AP; every variant measured before pins it off
    assert main.student.whiten
    # SFT runs 1500 steps since History AT; every variant measured before pins 1000 (or its own;
    # the 384-wide one measured 1500 steps too)
    assert main.sft_set == ["iters=1500"]
    # variants measured since History AT change GRPO only: whitened, SFT 1500 from the base
    since_at = {"repro_pipeline_noans.toml", "repro_pipeline_noans_lr3.toml",
                "repro_pipeline_bscale.toml", "repro_pipeline_acc_only.toml",
                "repro_pipeline_judge2.toml",
                "repro_pipeline_expread.toml", "repro_pipeline_nocons.toml",
                "repro_pipeline_judge_reference.toml", "repro_pipeline_acc_only_lr5.toml",
                "repro_pipeline_expread_nocons.toml", "repro_pipeline_b48.toml",
                "repro_pipeline_b256.toml", "repro_pipeline_b256_nocons.toml"}
    # the shipped recipe with another teacher (AX: miscalibrated, AY: on 7 photos, AZ: coarse,
    # BD: perfect), some with the GRPO decimals back in
    teacher_only = {"repro_pipeline_biased.toml", "repro_pipeline_biased_dec.toml",
                    "repro_pipeline_teacher7.toml", "repro_pipeline_coarse.toml",
                    "repro_pipeline_coarse1.toml", "repro_pipeline_teacher0.toml"}
    # AX's teacher with another GRPO setting (BA: 120 steps, BB: no consistency reward,
    # BC: lr and KL x3, BE: two updates per rollout, BF: no KL, BG: rank reward x3,
    # BH: BG with BE, BI: one distortion type per GRPO batch, BJ: a threshold accuracy reward,
    # BL: the output head only, BM: the judge reading the decimal, BN: BM + reasoning reward,
    # CA: 256 images per step without consistency, CB: 128, CC: CB shipping the last step,
    # CD: CB for 30 steps, CE: CB with a reasoning reward)
    ax_grpo = {"repro_pipeline_biased_dec120.toml", "repro_pipeline_biased_dec_nocons.toml",
               "repro_pipeline_biased_dec_lr3kl3.toml", "repro_pipeline_biased_dec_mu2.toml",
               "repro_pipeline_biased_dec_kl0.toml", "repro_pipeline_biased_dec_rank3.toml",
               "repro_pipeline_biased_dec_rank3_mu2.toml", "repro_pipeline_biased_dec_bytype.toml",
               "repro_pipeline_biased_dec_thresh.toml", "repro_pipeline_biased_dec_head.toml",
               "repro_pipeline_biased_dec_judge2.toml", "repro_pipeline_biased_dec_reason.toml",
               "repro_pipeline_biased_dec_b256_nocons.toml",
               "repro_pipeline_biased_dec_b128_nocons.toml",
               "repro_pipeline_biased_dec_b128_nocons_last.toml",
               "repro_pipeline_biased_dec_b128_nocons_i30.toml",
               "repro_pipeline_biased_dec_b128_reason.toml"}
    # the shipped recipe with the budget moved from SFT to GRPO (BK: SFT 500, GRPO 140)
    split = {"repro_pipeline_short_cold.toml"}
    biased = reproduce.load_pipeline(bench / "repro_pipeline_biased.toml")
    # the shipped recipe with GRPO's MOS permuted across its rows (BW)
    labels_null = {"repro_pipeline_shuffled_mos.toml"}
    sft1500 = {"repro_pipeline_whiten_sft1500.toml", "repro_pipeline_384_sft1500.toml", *since_at,
               *labels_null,
               *teacher_only, *ax_grpo}
    for variant in sorted(bench.glob("repro_pipeline_*.toml")):
        cfg = reproduce.load_pipeline(variant)
        assert cfg.student.whiten == ("whiten" in variant.name or
                                      variant.name in since_at | teacher_only | ax_grpo | split
                                      | labels_null), \
            variant.name
        if variant.name in teacher_only:
            assert cfg.distill != main.distill and dataclasses.replace(
                cfg, base="", distill=main.distill,
                grpo_set=[x.replace("decimals=true", "decimals=false") for x in cfg.grpo_set]) \
                == main, variant.name
        if variant.name in ax_grpo:
            assert cfg.distill == biased.distill and cfg.grpo_set != biased.grpo_set
            assert dataclasses.replace(cfg, base="", distill=main.distill,
                                       grpo_set=main.grpo_set) == main, variant.name
        if variant.name in split:
            assert cfg.sft_set != main.sft_set and cfg.grpo_set != main.grpo_set
            assert dataclasses.replace(cfg, base="", sft_set=main.sft_set,
                                       grpo_set=main.grpo_set) == main, variant.name
        if variant.name in since_at:
            assert (dataclasses.replace(cfg, base="", grpo_set=main.grpo_set) == main), \
                variant.name
        if variant.name in labels_null:
            assert cfg.grpo_shuffled_mos and not main.grpo_shuffled_mos
            assert dataclasses.replace(cfg, base="", grpo_shuffled_mos=False) == main
        assert (cfg.sft_set == ["iters=1500"]) == (variant.name in sft1500), variant.name
    alias = reproduce.load_pipeline(bench / "repro_pipeline_whiten_sft1500.toml")
    assert dataclasses.replace(alias, base="") == main  # the name the first runs used
    previous = reproduce.load_pipeline(bench / "repro_pipeline_whiten_nodec.toml")
    assert dataclasses.replace(previous, base="", sft_set=["iters=1500"]) == main
    # the 384-wide variants were measured on GRPO's last step: they pin it over the base's mean
    assert reproduce.load_pipeline(bench / "repro_pipeline_384.toml").grpo_set == ["iters=60"]
    short = reproduce.load_pipeline(bench / "repro_pipeline_short_sft.toml")
    assert (short.sft_set, short.grpo_set, short.student.hidden_size) == \
        (["iters=500"], ["iters=100"], 256)


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

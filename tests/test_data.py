"""Label readers: every published layout, rescaling to 1-5, and every kind of problem."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.io
from fixtures_labels import make_image, make_images, write_csv

from qponder_mlx.labels import (
    KNOWN_FORMATS,
    LabelError,
    LabelProblem,
    Sample,
    detect_format,
    list_splits,
    load_labels,
    read_labels,
)

KONIQ_HEADER = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "MOS_zscore"]


def koniq_row(name, mos, sd=0.8):
    return [name, 1, 2, 3, 2, 1, 9, mos, sd, 50]


def by_id(samples: list[Sample]) -> dict[str, Sample]:
    return {s.id: s for s in samples}


def approx(x):
    return pytest.approx(x, abs=1e-9)


# ---------------------------------------------------------------- the published layouts


def test_koniq(tmp_path):
    make_images(tmp_path / "1024x768", ["a.jpg", "b.jpg"])
    csv_path = write_csv(
        tmp_path / "koniq10k_scores_and_distributions.csv",
        KONIQ_HEADER,
        [koniq_row("a.jpg", 3.5, 0.8), koniq_row("b.jpg", 1.0, 0.2)],
    )
    assert detect_format(csv_path) == "koniq"
    samples = load_labels(csv_path)
    s = by_id(samples)
    assert list(s) == ["a.jpg", "b.jpg"]
    # Native 1-5: unchanged.
    assert s["a.jpg"].mos == approx(3.5) and s["a.jpg"].mos_std == approx(0.8)
    assert s["a.jpg"].raw_mos == 3.5
    assert s["b.jpg"].mos == approx(1.0)
    # The 1024x768/ folder next to the CSV is the default root.
    assert s["a.jpg"].image == (tmp_path / "1024x768" / "a.jpg").resolve()
    assert s["a.jpg"].image.is_absolute()


def test_mos_range_overrides_native_range_and_rescales_std(tmp_path):
    make_images(tmp_path, ["a.jpg"])
    csv_path = write_csv(
        tmp_path / "koniq10k_scores_and_distributions.csv", KONIQ_HEADER, [koniq_row("a.jpg", 3.5)]
    )
    (s,) = load_labels(csv_path, mos_range=(0, 10))
    assert s.mos == approx(1 + 4 * 0.35)  # 2.4
    assert s.mos_std == approx(0.8 * 4 / 10)  # 0.32
    assert s.raw_mos == 3.5


def test_kadid_std_is_sqrt_of_var(tmp_path):
    make_images(tmp_path / "images", ["I01_01_01.png", "I01_01_02.png"])
    csv_path = write_csv(
        tmp_path / "dmos.csv",
        ["dist_img", "ref_img", "dmos", "var"],
        [["I01_01_01.png", "I01.png", 4.2, 0.25], ["I01_01_02.png", "I01.png", 2.0, 0.0]],
    )
    assert detect_format(csv_path) == "kadid"
    s = by_id(load_labels(csv_path))
    assert s["I01_01_01.png"].mos == approx(4.2)
    assert s["I01_01_01.png"].mos_std == approx(0.5)
    assert s["I01_01_02.png"].mos_std == approx(0.0)
    assert s["I01_01_01.png"].image == (tmp_path / "images" / "I01_01_01.png").resolve()


def write_livec(root, names, mos, std=None):
    data = root / "Data"
    data.mkdir(parents=True)
    cell = np.empty((len(names), 1), dtype=object)  # MATLAB N x 1 cell array of char
    cell[:, 0] = names
    scipy.io.savemat(data / "AllImages_release.mat", {"AllImages_release": cell})
    scipy.io.savemat(data / "AllMOS_release.mat", {"AllMOS_release": np.array([mos], float)})
    if std is not None:
        scipy.io.savemat(
            data / "AllStdDev_release.mat", {"AllStdDev_release": np.array([std], float)}
        )
    return data


def test_livec_from_every_entry_point(tmp_path):
    make_image(tmp_path / "Images" / "trainingImages" / "t1.bmp")
    make_images(tmp_path / "Images", ["10.JPG", "100.bmp"])
    data = write_livec(tmp_path, ["t1.bmp", "10.JPG", "100.bmp"], [50.0, 75.0, 20.0], [8, 10, 5])
    entry_points = [
        tmp_path,
        data,
        data / "AllImages_release.mat",
        data / "AllMOS_release.mat",
        data / "AllStdDev_release.mat",
    ]
    for path in entry_points:
        assert detect_format(path) == "livec"
        s = by_id(load_labels(path))
        # 0-100 -> 1-5: 75 -> 1 + 4*0.75 = 4.0, 20 -> 1.8, std 10 -> 0.4.
        assert s["10.JPG"].mos == approx(4.0)
        assert s["100.bmp"].mos == approx(1.8)
        assert s["10.JPG"].mos_std == approx(0.4)
        assert s["10.JPG"].raw_mos == 75.0
        # The 7 training photos live in Images/trainingImages/.
        assert s["trainingImages/t1.bmp"].mos == approx(3.0)
        assert s["10.JPG"].image == (tmp_path / "Images" / "10.JPG").resolve()


def test_livec_without_std_file_and_with_length_mismatch(tmp_path):
    make_images(tmp_path / "Images", ["1.bmp"])
    data = write_livec(tmp_path, ["1.bmp"], [40.0])
    (s,) = load_labels(tmp_path)
    assert s.mos_std is None and s.mos == approx(2.6)

    scipy.io.savemat(data / "AllMOS_release.mat", {"AllMOS_release": np.array([[40.0, 50.0]])})
    samples, problems = read_labels(tmp_path)
    assert samples == []
    assert len(problems) == 1 and "1 names, 2 MOS" in str(problems[0])


def test_livec_missing_mat_file(tmp_path):
    data = write_livec(tmp_path, ["1.bmp"], [40.0])
    (data / "AllImages_release.mat").unlink()
    with pytest.raises(LabelError) as exc:
        read_labels(tmp_path, format="livec")
    assert "AllImages_release.mat: no such file" in str(exc.value)


def test_agiqa3k_scale_is_zero_to_five(tmp_path):
    make_images(tmp_path, ["AttnGAN_normal_000.jpg", "midjourney_normal_001.jpg"])
    header = ["name", "prompt", "adj1", "adj2", "style", "mos_quality", "std_quality", "mos_align"]
    csv_path = write_csv(
        tmp_path / "data.csv",
        header,
        [
            ["AttnGAN_normal_000.jpg", "statue of a man", "", "", "", 0.195, 0.5, 0.4],
            ["midjourney_normal_001.jpg", '"a tray, of sushi"', "", "", "", 2.5, 1.0, 3.1],
        ],
    )
    assert detect_format(csv_path) == "agiqa3k"
    s = by_id(load_labels(csv_path))
    # 0-5 -> 1-5: x -> 1 + 4x/5.
    assert s["midjourney_normal_001.jpg"].mos == approx(3.0)
    assert s["midjourney_normal_001.jpg"].mos_std == approx(0.8)
    assert s["AttnGAN_normal_000.jpg"].mos == approx(1 + 4 * 0.195 / 5)
    assert s["AttnGAN_normal_000.jpg"].mos_std == approx(0.4)


def test_spaq_xlsx_in_published_layout(tmp_path):
    import openpyxl

    make_images(tmp_path / "TestImage", ["00001.jpg", "00002.jpg"])
    xlsx = tmp_path / "Annotations" / "MOS and Image attribute scores.xlsx"
    xlsx.parent.mkdir()
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["Image name", "MOS", "Brightness", "Colorfulness", "Contrast"])
    ws.append(["00001.jpg", 60, 50, 40, 30])
    ws.append(["00002.jpg", 12.5, 50, 40, 30])
    ws.append(["00003.jpg", "n/a", 50, 40, 30])
    wb.save(xlsx)

    assert detect_format(xlsx) == "spaq"
    samples, problems = read_labels(xlsx)
    s = by_id(samples)
    assert s["00001.jpg"].mos == approx(3.4)  # 1 + 4*0.60
    assert s["00002.jpg"].mos == approx(1.5)  # 1 + 4*0.125
    assert s["00001.jpg"].image == (tmp_path / "TestImage" / "00001.jpg").resolve()
    # Excel row numbers: header is row 1.
    assert [str(p) for p in problems] == [
        f"{xlsx} row 4: MOS 'n/a' is not a number — fix or drop the row"
    ]


def test_spaq_csv_export(tmp_path):
    make_images(tmp_path / "TestImage", ["00001.jpg"])
    csv_path = write_csv(
        tmp_path / "MOS and Image attribute scores.csv",
        ["Image name", "MOS", "Brightness"],
        [["00001.jpg", 25, 3]],
    )
    assert detect_format(csv_path) == "spaq"
    (s,) = load_labels(csv_path)
    assert s.mos == approx(2.0)


def test_qalign_json(tmp_path):
    make_images(tmp_path / "koniq", ["a.jpg", "b.jpg"])
    meta = tmp_path / "test_koniq.json"
    meta.write_text(
        json.dumps(
            [
                {"image": "koniq/a.jpg", "gt_score": 3.2, "std": 0.5},
                {"id": "custom-b", "image": "koniq/b.jpg", "gt_score": 4.75},
            ]
        )
    )
    assert detect_format(meta) == "qalign_json"
    s = by_id(load_labels(meta))
    assert s["koniq/a.jpg"].mos == approx(3.2) and s["koniq/a.jpg"].mos_std == approx(0.5)
    assert s["custom-b"].mos == approx(4.75) and s["custom-b"].mos_std is None
    assert load_labels(meta, format="deqa") == load_labels(meta)


def test_qalign_json_out_of_range_suggests_mos_range(tmp_path):
    make_images(tmp_path, ["a.jpg", "b.jpg"])
    meta = tmp_path / "livec.json"
    meta.write_text(
        json.dumps([{"image": "a.jpg", "gt_score": 72.0}, {"image": "b.jpg", "gt_score": 3}])
    )
    samples, problems = read_labels(meta)
    assert [s.id for s in samples] == ["b.jpg"]
    (p,) = problems
    assert p.row == 1
    msg = str(p)
    assert msg.startswith(f"{meta} item 1: MOS 72 is outside the declared range 1–5")
    assert "mos_range=(lo, hi)" in msg and "--mos-range LO,HI" in msg

    s = by_id(load_labels(meta, mos_range=(0, 100)))
    assert s["a.jpg"].mos == approx(1 + 4 * 0.72)
    assert s["b.jpg"].mos == approx(1.12)


# pyiqa meta-info CSVs (chaofengc/IQA-PyTorch-Datasets-metainfo): the image column first, then
# mos and std; split columns `official_split` or `ratio802_seed123_split_NN` (train/val/test),
# or, in files before pyiqa merged its splits in, `split` (training/validation/test).
def pyiqa_root(tmp_path, images_dir, names):
    make_images(tmp_path / images_dir, names)
    return tmp_path / "meta_info"


def test_pyiqa_koniq_scale_std_and_official_split(tmp_path):
    meta = pyiqa_root(tmp_path, "koniq10k/512x384", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    path = write_csv(meta / "meta_info_KonIQ10kDataset.csv",
                     ["img_name", "mos", "std", "official_split", "c1"],
                     [["a.jpg", 77.3836206897, 0.527, "train", 0.0],
                      ["b.jpg", 68.7285714286, 0.58, "test", 0.0],
                      ["c.jpg", 0, 0.5, "val", 0.0],
                      ["d.jpg", 100, 0.5, "train", 0.0]])
    assert detect_format(path) == "pyiqa"
    s = by_id(load_labels(path))
    assert list(s) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    # mos is KonIQ's 0-100 MOS_zscore: 1 + 4 * 77.38/100; its std is on 1-5, so it is dropped
    assert s["a.jpg"].mos == approx(4.095344827588) and s["a.jpg"].mos_std is None
    assert s["c.jpg"].mos == approx(1.0) and s["d.jpg"].mos == approx(5.0)
    assert s["a.jpg"].image == (tmp_path / "koniq10k/512x384/a.jpg").resolve()
    assert [x.id for x in load_labels(path, split="test")] == ["b.jpg"]
    assert [x.id for x in load_labels(path, split="training")] == ["a.jpg", "d.jpg"]
    assert list_splits(path) == {"official_split": {"test": 1, "train": 2, "val": 1}}


def test_pyiqa_legacy_split_column_values_are_normalised(tmp_path):
    meta = pyiqa_root(tmp_path, "koniq10k/1024x768", ["a.jpg", "b.jpg"])  # no 512x384/
    path = write_csv(meta / "meta_info_KonIQ10kDataset.csv",
                     ["img_name", "mos", "std", "split"],
                     [["a.jpg", 50, 0.5, "training"], ["b.jpg", 60, 0.5, "validation"]])
    (s,) = load_labels(path, split="val")
    assert s.id == "b.jpg" and s.image.parent.name == "1024x768"
    assert list_splits(path) == {"split": {"train": 1, "val": 1}}


def test_pyiqa_kadid_full_reference_and_random_splits(tmp_path):
    meta = pyiqa_root(tmp_path, "kadid10k/images", ["I01_01_01.png", "I01_01_02.png"])
    path = write_csv(meta / "meta_info_KADID10kDataset.csv",
                     ["ref_name", "dist_name", "dmos", "std", "ratio802_seed123_split_01",
                      "ratio802_seed123_split_02"],
                     [["I01.png", "I01_01_01.png", 4.57, 0.496, "train", "val"],
                      ["I01.png", "I01_01_02.png", 4.33, 0.869, "val", "train"]])
    s = by_id(load_labels(path))
    # the distorted image is scored; KADID's dmos is a 1-5 MOS, higher is better; std as is
    assert s["I01_01_01.png"].mos == approx(4.57) and s["I01_01_01.png"].mos_std == approx(0.496)
    assert [x.id for x in load_labels(path, split="val")] == ["I01_01_02.png"]  # split 01
    got = load_labels(path, split="val", split_column="ratio802_seed123_split_02")
    assert [x.id for x in got] == ["I01_01_01.png"]
    for kwargs, msg in (
        ({"split": "test"}, "no rows with split 'test' in column 'ratio802_seed123_split_01' "
                            "(values: train, val)"),
        ({"split": "val", "split_column": "official_split"},
         "no split column 'official_split' (split columns: ratio802_seed123_split_01, "
         "ratio802_seed123_split_02)"),
        ({"split_column": "ratio802_seed123_split_02"},
         "split_column='ratio802_seed123_split_02' needs split=train|val|test"),
    ):
        with pytest.raises(LabelError) as exc:
            load_labels(path, **kwargs)
        assert str(exc.value) == f"{path}: {msg}"


def test_pyiqa_livec_practice_photos_and_scale(tmp_path):
    meta = pyiqa_root(tmp_path, "LIVEC/Images", ["100.bmp"])
    make_images(tmp_path / "LIVEC/Images/trainingImages", ["t1.bmp"])
    path = write_csv(meta / "meta_info_LIVEChallengeDataset.csv", ["img_name", "mos", "std"],
                     [["t1.bmp", 63.963406174124174, 18.376200073180403],
                      ["100.bmp", 32.56107532210109, 19.12472638223644]])
    s = by_id(load_labels(path))  # as the LIVE-C .mat reader: found in the subfolder
    assert s["trainingImages/t1.bmp"].image.parent.name == "trainingImages"
    assert s["100.bmp"].mos == approx(1 + 4 * 0.3256107532210109)
    assert s["100.bmp"].mos_std == approx(19.12472638223644 * 4 / 100)
    with pytest.raises(LabelError, match="has no split column"):
        load_labels(path, split="test")


def test_pyiqa_file_we_do_not_know_needs_its_range(tmp_path):
    make_images(tmp_path / "tid2013", ["i01_01_1.bmp"])
    path = write_csv(tmp_path / "meta_info" / "meta_info_TID2013Dataset.csv",
                     ["ref_name", "dist_name", "mos", "std"],
                     [["I01.BMP", "i01_01_1.bmp", 5.51429, 0.13013]])
    samples, problems = read_labels(path, images_root=tmp_path / "tid2013")
    assert samples == [] and "--mos-range LO,HI" in problems[0].message
    (s,) = load_labels(path, images_root=tmp_path / "tid2013", mos_range=(0, 9))
    assert s.mos == approx(1 + 4 * 5.51429 / 9)


def test_deqa_metas_layout_and_scale(tmp_path):
    root = tmp_path / "Data-DeQA-Score"
    make_images(root / "AGIQA3K" / "images", ["a.jpg", "b.jpg"])
    meta = root / "AGIQA3K" / "metas" / "test_agiqa_3k.json"
    meta.parent.mkdir(parents=True)
    items = [{"id": "a.jpg->0.4", "image": "AGIQA3K/images/a.jpg", "gt_score": 0.4,
              "gt_score_norm": 1.2, "std": 0.5, "std_norm": 0.4},
             {"id": "b.jpg->4.1", "image": "AGIQA3K/images/b.jpg", "gt_score": 4.1, "std": 0.3}]
    meta.write_text(json.dumps(items))
    assert detect_format(meta) == "deqa"
    # gt_score is each set's raw MOS: 0.4 is outside 1-5, so the scale must be given
    samples, problems = read_labels(meta)
    assert samples == [] and "0.4..4.1, not 1–5" in problems[0].message
    s = by_id(load_labels(meta, mos_range=(0, 5)))
    assert s["a.jpg->0.4"].mos == approx(1.32) and s["a.jpg->0.4"].mos_std == approx(0.4)
    assert s["b.jpg->4.1"].image == (root / "AGIQA3K/images/b.jpg").resolve()
    # images elsewhere (an archive unpacked flat): the <SET>/images/ prefix is not needed
    make_images(tmp_path / "flat", ["a.jpg", "b.jpg"])
    got = load_labels(meta, mos_range=(0, 5), images_root=tmp_path / "flat")
    assert [x.image.parent.name for x in got] == ["flat", "flat"]
    items[1]["image"] = "AGIQA3K/images/../../../b.jpg"
    meta.write_text(json.dumps(items))
    _, problems = read_labels(meta, mos_range=(0, 5))
    assert "leaves the images root" in problems[0].message
    with pytest.raises(LabelError, match="a deqa file has no split column"):
        load_labels(meta, mos_range=(0, 5), split="test")


def test_jsonl_blank_lines_ids_and_bad_line(tmp_path):
    make_images(tmp_path / "img", ["a.png", "b.png", "c.png"])
    path = tmp_path / "labels.jsonl"
    lines = [
        json.dumps({"image": "img/a.png", "mos": 4.5, "mos_std": 0.3}),
        "",
        "{not json",
        json.dumps({"image": "img/b.png", "mos": 2, "id": "bee"}),
        "   ",
        json.dumps([1, 2]),
        json.dumps({"image": "img/c.png"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    samples, problems = read_labels(path)
    s = by_id(samples)
    assert set(s) == {"img/a.png", "bee"}
    assert s["img/a.png"].mos_std == approx(0.3)
    assert s["bee"].mos == approx(2.0)
    assert [(p.row, p.unit) for p in problems] == [(3, "line"), (6, "line"), (7, "line")]
    assert str(problems[0]).startswith(f"{path} line 3: not valid JSON")
    assert "expected an object" in problems[1].message
    assert "no 'mos' key" in problems[2].message


def test_generic_csv_with_bom_and_crlf(tmp_path):
    make_images(tmp_path, ["x.jpg", "y.jpg"])
    path = write_csv(
        tmp_path / "mine.csv",
        ["filename", "score"],
        [["x.jpg", 1.5], ["y.jpg", 5]],
        bom=True,
        crlf=True,
    )
    assert path.read_bytes().startswith(b"\xef\xbb\xbffilename")
    assert detect_format(path) == "csv"
    s = by_id(load_labels(path))
    # All values in 1-5: the scale is taken as 1-5.
    assert s["x.jpg"].mos == approx(1.5) and s["y.jpg"].mos == approx(5.0)
    assert s["x.jpg"].raw_mos == 1.5


def test_generic_csv_other_scale_needs_mos_range(tmp_path):
    make_images(tmp_path, ["x.jpg", "y.jpg"])
    path = write_csv(tmp_path / "mine.csv", ["image", "mos"], [["x.jpg", 10], ["y.jpg", 87.5]])
    samples, problems = read_labels(path)
    assert samples == []
    (p,) = problems
    assert p.row is None
    assert "10..87.5" in p.message and "--mos-range LO,HI" in p.message
    s = by_id(load_labels(path, mos_range=(0, 100)))
    assert s["y.jpg"].mos == approx(4.5)


def test_generic_csv_named_columns(tmp_path):
    make_images(tmp_path, ["x.jpg"])
    path = write_csv(tmp_path / "mine.csv", ["pic", "rating", "other"], [["x.jpg", 7, 0]])
    (s,) = load_labels(path, image_column="pic", mos_column="rating", mos_range=(0, 10))
    assert s.mos == approx(3.8)


def test_known_formats_and_ranges():
    assert KNOWN_FORMATS == {
        "koniq": (1.0, 5.0),
        "kadid": (1.0, 5.0),
        "livec": (0.0, 100.0),
        "agiqa3k": (0.0, 5.0),
        "spaq": (0.0, 100.0),
        "qalign_json": (1.0, 5.0),
        "deqa": None,
        "pyiqa": None,
        "jsonl": (1.0, 5.0),
        "csv": None,
    }


# ---------------------------------------------------------------- problems, all at once


def test_every_row_problem_is_reported_together(tmp_path):
    root = tmp_path / "ds"
    make_images(root, ["ok.jpg", "dup.jpg", "sub/deep.jpg"])
    (root / "notes.jpg").write_text("I am text")
    outside = make_image(tmp_path / "elsewhere" / "x.jpg")
    rows = [
        koniq_row("ok.jpg", 3.0),  # row 2
        koniq_row("nan_mos.jpg", "nan"),  # row 3
        koniq_row("inf_mos.jpg", "inf"),  # row 4
        koniq_row("empty_mos.jpg", ""),  # row 5
        koniq_row("word_mos.jpg", "good"),  # row 6
        koniq_row("dup.jpg", 7.5),  # row 7: outside 1-5
        koniq_row("missing.jpg", 2.0),  # row 8
        koniq_row("notes.jpg", 2.0),  # row 9: not an image
        koniq_row("../elsewhere/x.jpg", 2.0),  # row 10: escapes the root
        koniq_row(str(outside), 2.0),  # row 11: absolute, outside the root
        koniq_row("dup.jpg", 2.0),  # row 12: first valid dup.jpg
        koniq_row("dup.jpg", 2.5),  # row 13: duplicate
        koniq_row("", 2.5),  # row 14: no image name
        koniq_row("sub/deep.jpg", 4.0),  # row 15
        koniq_row(str(root / "ok.jpg"), 4.0),  # row 16: absolute inside root, same id as row 2
    ]
    path = write_csv(tmp_path / "koniq10k_scores_and_distributions.csv", KONIQ_HEADER, rows)

    samples, problems = read_labels(path, images_root=root)
    assert sorted(s.id for s in samples) == ["dup.jpg", "ok.jpg", "sub/deep.jpg"]
    assert [p.row for p in problems] == [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 16]
    text = {p.row: str(p) for p in problems}
    assert text[3] == f"{path} row 3: MOS 'nan' is not a finite number — fix or drop the row"
    assert "'inf' is not a finite number" in text[4]
    assert "MOS is empty" in text[5]
    assert "'good' is not a number" in text[6]
    assert "MOS 7.5 is outside the declared range 1–5" in text[7]
    assert "image not found" in text[8] and "missing.jpg" in text[8]
    assert "unreadable" in text[9] and "notes.jpg" in text[9]
    assert "leaves the images root" in text[10] and "../elsewhere/x.jpg" in text[10]
    assert "leaves the images root" in text[11]
    assert "duplicate id 'dup.jpg' (first at row 12)" in text[13]
    assert "image name is empty" in text[14]
    assert "duplicate id 'ok.jpg' (first at row 2)" in text[16]

    with pytest.raises(LabelError) as exc:
        load_labels(path, images_root=root)
    assert exc.value.problems == problems
    lines = str(exc.value).splitlines()
    assert lines[0] == f"12 problems in {path}:"
    assert lines[1:] == [str(p) for p in problems]


def test_missing_columns_name_what_was_found(tmp_path):
    path = write_csv(tmp_path / "dmos.csv", ["dist_img", "ref_img", "dmos_typo"], [["a", "b", 1]])
    with pytest.raises(LabelError) as exc:
        load_labels(path, format="kadid")
    (p,) = exc.value.problems
    assert p.row is None
    assert "missing MOS column 'dmos'" in p.message
    assert "found: dist_img, ref_img, dmos_typo" in p.message

    path = write_csv(tmp_path / "x.csv", ["foo", "bar"], [["a", "b"]])
    _, problems = read_labels(path)
    assert len(problems) == 2
    assert "missing image column (one of image, image_name," in problems[0].message
    assert "missing MOS column" in problems[1].message
    assert "mos_column=" in problems[1].message


def test_json_that_is_not_a_list(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"image": "a.jpg", "gt_score": 3}))
    with pytest.raises(LabelError) as exc:
        load_labels(meta)
    assert str(exc.value) == (
        f"{meta}: top level is a JSON object, expected a list of objects with 'image' and "
        "'gt_score' — fix the file"
    )
    meta.write_text("[{")
    _, problems = read_labels(meta)
    assert "not valid JSON" in problems[0].message


def test_missing_label_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LabelError) as exc:
        read_labels("labels.csv")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("labels.csv: no such file")


def test_unknown_format_lists_accepted_formats(tmp_path):
    path = tmp_path / "labels.yaml"
    path.write_text("a: 1\n")
    with pytest.raises(LabelError) as exc:
        read_labels(path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}: unknown label format")
    assert "koniq, kadid, livec, agiqa3k, spaq, qalign_json, deqa, pyiqa, jsonl, csv" in msg

    with pytest.raises(LabelError, match="unknown format 'tid2013'"):
        read_labels(path, format="tid2013")
    with pytest.raises(LabelError, match="folder without labels"):
        read_labels(tmp_path)


def test_free_form_absolute_paths_follow_the_root_rule(tmp_path):
    elsewhere = make_image(tmp_path / "photos" / "x.jpg")
    inside = make_image(tmp_path / "lists" / "imgs" / "y.jpg")
    path = tmp_path / "lists" / "labels.jsonl"
    lines = [
        json.dumps({"image": str(elsewhere), "mos": 3}),
        json.dumps({"image": "../photos/x.jpg", "mos": 3, "id": "rel"}),
        json.dumps({"image": str(inside), "mos": 4}),
    ]
    path.write_text("\n".join(lines))
    # No images_root: the list is the user's own; absolute paths and .. are taken as written.
    s = by_id(load_labels(path))
    assert s[elsewhere.as_posix()].image == elsewhere.resolve()
    assert s["rel"].image == elsewhere.resolve()
    assert s["imgs/y.jpg"].image == inside.resolve()
    # With an explicit root, only paths inside it are allowed.
    samples, problems = read_labels(path, images_root=tmp_path / "lists")
    assert [p.row for p in problems] == [1, 2]
    assert all("leaves the images root" in p.message for p in problems)
    assert [s.id for s in samples] == ["imgs/y.jpg"]


def test_symlinked_image_folder_is_not_an_escape(tmp_path):
    real = tmp_path / "disk" / "koniq_images"
    make_images(real, ["a.jpg"])
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "1024x768").symlink_to(real, target_is_directory=True)
    path = write_csv(
        ds / "koniq10k_scores_and_distributions.csv", KONIQ_HEADER, [koniq_row("a.jpg", 2)]
    )
    (s,) = load_labels(path)
    assert s.id == "a.jpg"
    assert s.image == (real / "a.jpg").resolve()


def test_check_images_false_skips_file_checks(tmp_path):
    path = write_csv(
        tmp_path / "koniq10k_scores_and_distributions.csv",
        KONIQ_HEADER,
        [koniq_row("not_here.jpg", 2.0)],
    )
    _, problems = read_labels(path)
    assert len(problems) == 1 and "image not found" in problems[0].message
    (s,) = load_labels(path, check_images=False)
    assert s.id == "not_here.jpg" and s.image == (tmp_path / "not_here.jpg").resolve()


def test_missing_images_folder_is_one_problem(tmp_path):
    path = write_csv(
        tmp_path / "koniq10k_scores_and_distributions.csv",
        KONIQ_HEADER,
        [koniq_row(f"{i}.jpg", 2.0) for i in range(50)],
    )
    samples, problems = read_labels(path, images_root=tmp_path / "nowhere")
    assert samples == []
    assert [str(p) for p in problems] == [
        f"{path}: images folder {tmp_path / 'nowhere'} does not exist — pass images_root=... "
        "/ --images-root"
    ]


def test_corrupt_xlsx_is_a_problem_not_a_crash(tmp_path):
    path = tmp_path / "MOS and Image attribute scores.xlsx"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    samples, problems = read_labels(path)
    assert samples == []
    assert len(problems) == 1 and "cannot read the table" in problems[0].message


def test_bad_mos_range_argument():
    with pytest.raises(ValueError, match="lo < hi"):
        read_labels("whatever.csv", mos_range=(5, 1))
    with pytest.raises(ValueError, match="lo < hi"):
        read_labels("whatever.csv", mos_range=(0, math.inf))


def test_label_problem_formatting():
    assert str(LabelProblem("labels.csv", 12, "MOS 'nan' is not a finite number — fix")) == (
        "labels.csv row 12: MOS 'nan' is not a finite number — fix"
    )
    assert str(LabelProblem("labels.csv", None, "no such file")) == "labels.csv: no such file"
    assert str(LabelProblem("a.jsonl", 3, "bad", unit="line")) == "a.jsonl line 3: bad"
    err = LabelError([LabelProblem("a.csv", 2, "x"), LabelProblem("a.csv", 3, "y")])
    assert str(err) == "2 problems in a.csv:\na.csv row 2: x\na.csv row 3: y"
    assert isinstance(err, ValueError)

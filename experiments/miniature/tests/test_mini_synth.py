"""KADID-style distortions at KADID's levels, and synth_iqa.py."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter
from synth import LEVEL_MOS, LEVELS, crop_view, distort, view_index
from synth_iqa import main as synth_iqa


def _img(seed=0, size=64):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def test_noise_has_the_kadid_variance():
    flat = Image.fromarray(np.full((200, 200, 3), 128, np.uint8))
    for level, var in enumerate(LEVELS["noise"], start=1):
        x = np.asarray(distort(flat, "noise", level), dtype=np.float64) / 255
        assert x.var() == pytest.approx(var, rel=0.1)


def test_blur_matches_a_gaussian_of_kadid_sigma_and_kernel():
    img = _img()
    out = np.asarray(distort(img, "blur", 4), dtype=np.float64)  # sigma 2, kernel 2*4+1
    x = np.asarray(img, dtype=np.float64) / 255
    ref = np.stack([gaussian_filter(x[..., c], 2.0, truncate=2.0) for c in range(3)], -1)
    np.testing.assert_allclose(out, np.clip(ref, 0, 1) * 255, atol=0.51)


def test_jpeg_levels_get_worse_and_labels_are_monotone():
    img = _img(size=128)
    x = np.asarray(img, dtype=np.float64)
    err = [np.abs(np.asarray(distort(img, "jpeg", lv), dtype=np.float64) - x).mean()
           for lv in range(1, 6)]
    assert err == sorted(err)
    for kind in LEVEL_MOS:
        assert LEVEL_MOS[kind] == sorted(LEVEL_MOS[kind], reverse=True)
    with pytest.raises(ValueError, match="unknown distortion"):
        distort(img, "contrast", 1)


def test_synth_iqa_cli_splits_by_photo(tmp_path, capsys):
    pytest.importorskip("skimage")
    assert synth_iqa([str(tmp_path), "--size", "64", "--photos", "astronaut,chelsea",
                      "--test-photos", "chelsea"]) == 0
    test = [json.loads(x) for x in (tmp_path / "test.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(test) == len(train) == 15
    assert {r["reference"] for r in test} == {"chelsea"}
    assert {r["reference"] for r in train} == {"astronaut"}
    from qponder_mlx.labels import load_labels
    samples = load_labels(tmp_path / "test.jsonl")
    assert len(samples) == 15 and samples[0].mos == pytest.approx(LEVEL_MOS["blur"][0])
    capsys.readouterr()
    assert synth_iqa([str(tmp_path / "x"), "--photos", "dog"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--photos" in err and "dog" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_synth_iqa_crops_only_for_train_photos(tmp_path):
    pytest.importorskip("skimage")
    args = ["--size", "56", "--photos", "astronaut,chelsea", "--test-photos", "chelsea",
            "--crops", "2", "--seed", "3"]
    assert synth_iqa([str(tmp_path / "a"), *args]) == 0
    def rows(split):
        return [json.loads(x) for x in (tmp_path / "a" / f"{split}.jsonl").read_text().splitlines()]

    train, test = rows("train"), rows("test")
    assert len(train) == 3 * 15 and len(test) == 15          # centre + 2 crops; test: centre only
    assert {r["reference"] for r in train} == {"astronaut"}  # crops keep their photo's name
    assert {r["reference"] for r in test} == {"chelsea"}
    stems = sorted({r["id"].rsplit("_", 2)[0] for r in train})
    assert stems == ["astronaut", "astronaut_crop0", "astronaut_crop1"]
    assert sorted({r["view"] for r in train}) == stems        # each row names its view
    assert all(r["id"].startswith(r["view"] + "_") for r in train + test)
    pngs = [np.asarray(Image.open(tmp_path / "a" / f"images/{s}_noise_1.png")) for s in stems]
    assert all(p.shape == (56, 56, 3) for p in pngs)
    assert not np.array_equal(pngs[0], pngs[1]) and not np.array_equal(pngs[1], pngs[2])
    # The same seed gives the same crops.
    assert synth_iqa([str(tmp_path / "b"), *args]) == 0
    again = np.asarray(Image.open(tmp_path / "b" / "images/astronaut_crop1_noise_1.png"))
    assert np.array_equal(again, pngs[2])


def _synth_coffee_test(out: Path, photos: str, *, crops: int = 0, test_crops: int = 0,
                       seed: int = 0) -> Path:
    """synth_iqa.py at 56 px with coffee held out; returns the set's folder."""
    assert synth_iqa([str(out), "--size", "56", "--photos", photos, "--test-photos", "coffee",
                      "--crops", str(crops), "--test-crops", str(test_crops),
                      "--seed", str(seed)]) == 0
    return out


def test_held_out_images_do_not_depend_on_the_rest_of_the_set(tmp_path):
    """Noise draws are seeded by the view's own name: adding train photos or crops leaves every
    held-out image bit-identical (a positional seed changed them), and another seed changes them."""
    pytest.importorskip("skimage")

    def noisy(name, photos, crops=0, seed=0):
        out = _synth_coffee_test(tmp_path / name, photos, crops=crops, seed=seed)
        return np.asarray(Image.open(out / "images/coffee_noise_3.png"))

    small = noisy("small", "coffee,chelsea")
    assert np.array_equal(small, noisy("big", "astronaut,brick,chelsea,coffee,retina", 3))
    assert not np.array_equal(small, noisy("other", "coffee,chelsea", seed=1))


def test_test_crops_go_to_their_own_file(tmp_path):
    """--test-crops: random views of the TEST photos in test_crops.jsonl; test.jsonl keeps the
    centre views only, train.jsonl is untouched."""
    pytest.importorskip("skimage")

    def splits(name, test_crops):
        out = _synth_coffee_test(tmp_path / name, "astronaut,coffee", crops=1,
                                 test_crops=test_crops)
        return {f: (out / f).read_text() for f in ("train.jsonl", "test.jsonl")}

    plain, more = splits("plain", 0), splits("more", 2)
    assert plain == more                                   # same train and test files
    crops = [json.loads(x) for x in (tmp_path / "more" / "test_crops.jsonl").open()]
    assert len(crops) == 2 * 15 and {r["reference"] for r in crops} == {"coffee"}
    assert all("_crop" in r["id"] for r in crops)
    assert not (tmp_path / "plain" / "test_crops.jsonl").exists()


def test_view_index_orders_the_photo_then_its_crops():
    assert view_index("astronaut", "astronaut") == 0
    assert view_index("astronaut", "astronaut_crop0") == 1
    assert view_index("astronaut", "astronaut_crop15") == 16
    # a photo whose own name holds "_crop" still parses: the photo's name is stripped first
    assert view_index("a_crop", "a_crop_crop3") == 4
    # the inverse of the name synth_iqa.py gives each crop
    assert all(view_index("coins", crop_view("coins", k)) == k + 1 for k in range(20))

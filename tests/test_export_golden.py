"""Golden vectors and the app contract: what an app rebuilds from the manifest, checked in a new
process by `qponder bundle verify`, and refused when a value is edited."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from qponder_mlx.cli.main import app
from qponder_mlx.export.bundle import export_bundle, load_bundle
from qponder_mlx.export.config import ExportConfig
from qponder_mlx.export.golden import GOLDEN_FILE, GOLDEN_IMAGES, SCORE_TOL
from qponder_mlx.export.manifest import MANIFEST, sha256_file, write_manifest
from qponder_mlx.export.verify import verify_bundle
from typer.testing import CliRunner

from qponder_mlx.images import PixelPolicy, smart_resize
from qponder_mlx.prompts import FAST_ANSWER_PREFIX
from qponder_mlx.scoring import ScoreConfig, Scorer

SMALL = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}


@pytest.fixture(scope="module")
def bundle(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "b"
    return export_bundle(ExportConfig(model=str(tiny_model_dir), out=str(out), agreement=False,
                                      **SMALL), progress=False)


@pytest.fixture(scope="module")
def golden(bundle):
    return json.loads((bundle.out / GOLDEN_FILE).read_text())


def _reseal(folder, rel):
    """Rewrite the manifest so its checksums cover an edited file (a consistent tamper)."""
    m = json.loads((folder / MANIFEST).read_text())
    m["files"][rel] = {"sha256": sha256_file(folder / rel), "size": (folder / rel).stat().st_size}
    write_manifest(folder, m)


def test_golden_images_ship_in_the_bundle_and_are_protected(bundle, golden):
    files = bundle.manifest["files"]
    assert [e["image"] for e in golden["images"]] == [f"golden/{n}" for n in GOLDEN_IMAGES]
    for e in golden["images"]:
        assert e["image"] in files
        assert hashlib.sha256((bundle.out / e["image"]).read_bytes()).hexdigest() == \
            e["image_sha256"]
    assert GOLDEN_FILE in files
    assert not list((bundle.out / "golden").glob("*.safetensors"))


def test_manifest_token_ids_rebuild_the_golden_input_ids(bundle, golden):
    t = bundle.manifest["tokens"]
    for e in golden["images"]:
        w, h = e["resized"]["width"], e["resized"]["height"]
        n = (h // 28) * (w // 28)
        assert e["grid_thw"] == [1, h // 14, w // 14]
        for prompt, ids in (("reason_prompt", "input_ids"), ("fast_prompt", "fast_input_ids")):
            p = t[prompt]
            assert p["before_image"] + [t["image_pad_id"]] * n + p["after_image"] == e[ids]
    loaded = load_bundle(bundle.out)
    tok = loaded.tokenizer
    assert tok.decode(t["answer_prefix_ids"]) == FAST_ANSWER_PREFIX
    assert [tok.decode([d["id"]]) for d in t["digits"]] == ["1", "2", "3", "4", "5"]
    assert [d["value"] for d in t["digits"]] == [1, 2, 3, 4, 5]
    assert tok.convert_tokens_to_ids("<|im_end|>") in t["stop_ids"]
    assert tok.convert_tokens_to_ids("<|image_pad|>") in t["banned_ids"]


def test_golden_pixels_are_pillow_bicubic_passes_at_the_smart_resize_size(golden, bundle):
    # Independent of PixelPolicy.resize: the documented rule applied by hand.
    for e in golden["images"]:
        img = Image.open(bundle.out / e["image"]).convert("RGB")
        h, w = smart_resize(img.height, img.width, **SMALL)
        # the documented order: the horizontal pass, then the vertical one
        rgb = np.asarray(img.resize((w, img.height), Image.Resampling.BICUBIC).resize(
            (w, h), Image.Resampling.BICUBIC), dtype=np.uint8)
        assert (e["resized"]["width"], e["resized"]["height"]) == (w, h)
        assert hashlib.sha256(rgb.tobytes()).hexdigest() == e["resized"]["rgb_sha256"]
        for s in e["resized"]["samples"]:
            assert list(rgb[s["y"], s["x"]]) == s["rgb"]


def test_golden_fast_score_agrees_with_the_scorer(golden, bundle):
    # The Scorer takes another path (shared-prefix cache, batched): same score within 1e-3.
    scorer = Scorer(load_bundle(bundle.out), ScoreConfig(mode="fast",
                                                         pixels=PixelPolicy(**SMALL)))
    results = scorer.score([bundle.out / e["image"] for e in golden["images"]])
    for e, r in zip(golden["images"], results):
        p = e["fast"]["digit_probs"]
        assert abs(sum(p) - 1) < 1e-5
        assert abs(e["fast"]["score"] - sum(pi * d for pi, d in zip(p, range(1, 6)))) < 1e-5
        assert abs(r.score - e["fast"]["score"]) < SCORE_TOL


def test_golden_vectors_recomputed_in_a_new_process_match(bundle):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "qponder_mlx.cli.main", "bundle", "verify",
                          str(bundle.out), "--no-progress"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "golden vectors recomputed and matched" in res.stdout


@pytest.mark.parametrize("edit, says", [
    (lambda e: e["fast"].__setitem__("score", e["fast"]["score"] + 0.01), "fast score"),
    (lambda e: e["reason"]["token_ids"].__setitem__(3, e["reason"]["token_ids"][3] + 1),
     "greedy token 3"),
    (lambda e: e["input_ids"].__setitem__(0, e["input_ids"][0] + 1), "input_ids"),
])
def test_an_edited_golden_value_fails_verify(bundle, tmp_path, edit, says):
    folder = tmp_path / "b"
    shutil.copytree(bundle.out, folder)
    doc = json.loads((folder / GOLDEN_FILE).read_text())
    edit(doc["images"][1])
    (folder / GOLDEN_FILE).write_text(json.dumps(doc))
    # Edited alone, the checksum catches it ...
    assert any(GOLDEN_FILE in p for p in verify_bundle(folder).problems)
    # ... and with the manifest resealed around the edit, the recomputation does.
    _reseal(folder, GOLDEN_FILE)
    assert verify_bundle(folder).ok
    res = CliRunner().invoke(app, ["bundle", "verify", str(folder), "--no-progress"])
    assert res.exit_code == 1
    assert f"{GOLDEN_IMAGES[1]} {says}" in res.output


def test_documented_resize_normalise_and_patchify_rebuild_the_pixel_values(bundle, golden):
    # What docs/export.md tells an app to do, in numpy: the bicubic port, /255, (x - mean) / std,
    # the image twice (temporal patch 2), Qwen2-VL's 14 px patches merged 2 x 2.
    from qponder_mlx.export.pillow_bicubic import resize

    pp = json.loads((bundle.out / "preprocessor_config.json").read_text())
    mean, std = np.float32(pp["image_mean"]), np.float32(pp["image_std"])
    for e in golden["images"]:
        w, h = e["resized"]["width"], e["resized"]["height"]
        rgb = resize(np.asarray(Image.open(bundle.out / e["image"]).convert("RGB")), w, h)
        assert hashlib.sha256(rgb.tobytes()).hexdigest() == e["resized"]["rgb_sha256"]
        x = (rgb.astype(np.float32) / np.float32(255) - mean) / std
        x = np.stack([x.transpose(2, 0, 1)] * 2)  # (T=2, C, H, W)
        gh, gw = h // 14, w // 14
        x = x.reshape(1, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).transpose(
            0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, 3 * 2 * 14 * 14)
        pv = e["pixel_values"]
        assert list(x.shape) == pv["shape"]
        flat = x.reshape(-1)
        np.testing.assert_allclose(flat[:8], pv["first"], atol=1e-4)
        np.testing.assert_allclose([flat[int(i)] for i in pv["at"]], list(pv["at"].values()),
                                   atol=1e-4)


def test_fast_prompt_is_the_reason_prompt_plus_the_answer_prefix(bundle):
    t = bundle.manifest["tokens"]
    assert t["fast_prompt"]["before_image"] == t["reason_prompt"]["before_image"]
    assert t["fast_prompt"]["after_image"] == \
        t["reason_prompt"]["after_image"] + t["answer_prefix_ids"]

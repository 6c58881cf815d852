"""`qponder export` bundles: fused + quantized correctly, loadable by stock mlx-vlm, verified.

The tiny model (hidden 64, intermediate 128) has every language-model linear width divisible by
64, so at group size 64 all 16 language-model layers (14 projections, embedding, lm_head) are
really quantized; the vision tower stays float as designed.
"""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from qponder_mlx.cli.main import app
from qponder_mlx.export import bundle as bundle_mod
from qponder_mlx.export.bundle import base_identity, export_bundle, load_bundle
from qponder_mlx.export.config import ExportConfig, ExportConfigError
from qponder_mlx.export.manifest import MANIFEST, MANIFEST_SHA, sha256_file
from qponder_mlx.export.verify import BundleError, verify_bundle
from typer.testing import CliRunner

from qponder_mlx import generate as gen
from qponder_mlx.images import PixelPolicy, load_image
from qponder_mlx.model import load_model
from qponder_mlx.prompts import PARSE_RULE, PROMPT_VERSION, USER_PROMPT, chat_messages
from qponder_mlx.scoring import ScoreConfig, Scorer
from qponder_mlx.train.config import LoraConfig
from qponder_mlx.train.lora import attach_lora, lora_layers, save_adapters

SMALL = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
AGREE = {"calibration_limit": 5, "reason_images": 2, "reason_max_tokens": 12, **SMALL}


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    loaded = load_model(str(tiny_model_dir))
    mx.random.seed(0)
    cfg = attach_lora(loaded.model, LoraConfig(rank=4, alpha=8))
    # LoRA B starts at zero (adapter = no-op); random B makes the fused weights differ.
    mx.random.seed(7)
    for _, m in lora_layers(loaded.model):
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.2
    return save_adapters(loaded.model, cfg, tmp_path_factory.mktemp("adapter") / "adapters")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="module")
def float_bundle(tiny_model_dir, adapter_dir, exports):
    return export_bundle(ExportConfig(model=str(tiny_model_dir), adapter=str(adapter_dir),
                                      out=str(exports / "float"), quantize=False, **AGREE),
                         progress=False)


@pytest.fixture(scope="module")
def q4_bundle(tiny_model_dir, adapter_dir, exports):
    return export_bundle(ExportConfig(model=str(tiny_model_dir), adapter=str(adapter_dir),
                                      out=str(exports / "q4"), **AGREE), progress=False)


@pytest.fixture(scope="module")
def adapter_model(tiny_model_dir, adapter_dir):
    return load_model(str(tiny_model_dir), adapter_dir)


@pytest.fixture(scope="module")
def prompt(adapter_model):
    return adapter_model.tokenizer.apply_chat_template(chat_messages(), tokenize=False,
                                                       add_generation_prompt=True)


@pytest.fixture(scope="module")
def images(cc0_labels):
    paths = sorted((cc0_labels.parent / "images").iterdir())[:3]
    policy = PixelPolicy(**SMALL)
    return [policy.resize(load_image(p)) for p in paths]


def _greedy(loaded, prompt, imgs, max_tokens=16):
    cfg = gen.SamplingConfig(max_tokens=max_tokens)
    return [gen.generate_rows(loaded.model, loaded.processor, [prompt], [img], cfg)[0][0].token_ids
            for img in imgs]


def _tensors(folder):
    return mx.load(str(folder / "model.safetensors"))


# --- the fused, float bundle is the adapter model ---------------------------------------------

def test_fused_weights_follow_the_lora_formula(tiny_model_dir, adapter_dir, float_bundle):
    """W' = W + scale * (A @ B)^T, checked in numpy against the raw base and adapter files."""
    base = _tensors(tiny_model_dir)
    lora = mx.load(str(adapter_dir / "adapters.safetensors"))
    scale = json.loads((adapter_dir / "adapter_config.json").read_text())[
        "lora_parameters"]["scale"]
    fused = _tensors(float_bundle.out)
    name = "language_model.model.layers.1.mlp.down_proj"
    a = np.array(lora[f"{name}.lora_a"])  # (in, r)
    b = np.array(lora[f"{name}.lora_b"])  # (r, out)
    want = np.array(base[f"{name}.weight"]) + scale * (a @ b).T
    np.testing.assert_allclose(np.array(fused[f"{name}.weight"]), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(want, np.array(base[f"{name}.weight"]), atol=1e-3)
    # no LoRA tensors and no quantization in a float bundle; vision weights untouched
    assert not any("lora" in k or k.endswith(".scales") for k in fused)
    v = "vision_tower.blocks.0.attn.qkv.weight"
    np.testing.assert_array_equal(np.array(fused[v]), np.array(base[v]))
    assert "quantization" not in json.loads((float_bundle.out / "config.json").read_text())


def test_float_bundle_greedy_equals_the_adapter_model(float_bundle, adapter_model, prompt,
                                                      images):
    bundled = load_bundle(float_bundle.out)
    ours, ref = _greedy(bundled, prompt, images), _greedy(adapter_model, prompt, images)
    assert ours == ref
    assert len({tuple(t) for t in ref}) > 1  # different images, different answers
    agree = float_bundle.manifest["agreement"]
    assert agree["reason"]["same_text_rate"] == 1.0
    assert agree["fast"]["mean_abs_delta"] < 1e-4


# --- the 4-bit bundle --------------------------------------------------------------------------

def test_q4_bundle_is_mlx_quantization_of_the_fused_weights(q4_bundle, float_bundle):
    cfg = json.loads((q4_bundle.out / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    q, f = _tensors(q4_bundle.out), _tensors(float_bundle.out)
    quantized = sorted(k.removesuffix(".scales") for k in q if k.endswith(".scales"))
    assert len(quantized) == 16 and all(k.startswith("language_model.") for k in quantized)
    # the packed weights are exactly mx.quantize of the fused float weights
    name = "language_model.model.layers.0.self_attn.q_proj"
    w, s, b = mx.quantize(f[f"{name}.weight"], group_size=64, bits=4)
    for got, want in ((q[f"{name}.weight"], w), (q[f"{name}.scales"], s),
                      (q[f"{name}.biases"], b)):
        np.testing.assert_array_equal(np.array(got), np.array(want))
    # vision tower stays float and equal to the float bundle's
    v = "vision_tower.blocks.0.attn.qkv.weight"
    np.testing.assert_array_equal(np.array(q[v]), np.array(f[v]))


def test_q4_bits_per_weight_match_the_stored_bytes(q4_bundle):
    qrep = q4_bundle.manifest["quantization"]
    # affine, group 64, float32 scale + bias per group: 4 + 2 * 32 / 64 bits
    assert qrep["quantized_layers_bits_per_weight"] == pytest.approx(4 + 2 * 32 / 64)
    t = _tensors(q4_bundle.out)
    bits = params = 0
    for k, v in t.items():
        if not k.startswith("language_model."):
            continue
        bits += v.nbytes * 8
        layer = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and f"{layer}.scales" in t:
            params += v.size * 32 // 4  # packed uint32 -> 8 four-bit weights each
        elif not k.endswith((".scales", ".biases")):
            params += v.size
    assert qrep["language_model_bits_per_weight"] == pytest.approx(bits / params, abs=1e-4)
    assert qrep["layers_quantized"] == 16
    assert all(n.startswith("vision_tower.") for n in qrep["float_layers"])


def test_q4_agreement_report_matches_an_independent_run(q4_bundle, adapter_model, cc0_labels):
    """Recompute the manifest's numbers with plain Scorer runs of both models."""
    from qponder_mlx.labels import read_labels

    samples, _ = read_labels(cc0_labels)
    paths = [s.image for s in samples[:AGREE["calibration_limit"]]]
    pixels = PixelPolicy(**SMALL)
    bundled = load_bundle(q4_bundle.out)
    fast = [[r.score for r in Scorer(m, ScoreConfig(mode="fast", pixels=pixels)).score(paths)]
            for m in (adapter_model, bundled)]
    delta = np.abs(np.subtract(*fast))
    rep = q4_bundle.manifest["agreement"]
    assert rep["fast"]["n"] == len(paths)
    assert rep["fast"]["mean_abs_delta"] == pytest.approx(delta.mean(), abs=1e-4)
    assert rep["fast"]["max_abs_delta"] == pytest.approx(delta.max(), abs=1e-4)
    assert 0 < delta.max() < 1.0  # 4 bits moves the scores a little, not wildly
    from scipy.stats import spearmanr

    assert rep["fast"]["srcc_bundle_vs_reference"] == pytest.approx(
        spearmanr(*fast).statistic, abs=1e-4)
    sampling = gen.SamplingConfig(max_tokens=AGREE["reason_max_tokens"])
    texts = [[r.text for r in Scorer(m, ScoreConfig(pixels=pixels, sampling=sampling)).score(
        paths[:AGREE["reason_images"]])] for m in (adapter_model, bundled)]
    same = np.mean([a == b for a, b in zip(*texts)])
    assert rep["reason"]["same_text_rate"] == pytest.approx(same)
    assert rep["reason"]["format_rate"] == {"reference": 0.0, "bundle": 0.0}  # random model
    mos = [s.mos for s in samples[:len(paths)]]
    assert rep["fast"]["mae_vs_mos"]["bundle"] == pytest.approx(
        np.mean(np.abs(np.subtract(fast[1], mos))), abs=1e-4)
    assert rep["fast_vs_reason"]["n"] == 0  # no reasoned score parses on a random model
    print(f"4-bit vs adapter model: greedy identical on {same:.0%} of "
          f"{len(texts[0])} images, mean |Δ fast score| {delta.mean():.4f}")


def test_fast_vs_reason_agreement_by_hand(tmp_path):
    """The bundle's fast scores against its own reasoned ones, on hand-made results."""
    from qponder_mlx.export.agreement import Calibration, ModelRun, compare

    from qponder_mlx.scoring import ScoreResult

    fast = [ScoreResult("a", 3.0), ScoreResult("b", 2.0), ScoreResult("c", 4.5)]
    reason = [ScoreResult("a", 3.5), ScoreResult("b", None), ScoreResult("c", 4.0)]
    calib = Calibration(tmp_path / "l.jsonl", "0" * 64, [tmp_path / n for n in "abc"],
                        [3.0, 2.5, 4.0])
    run = ModelRun(fast, reason)
    rep = compare(run, run, calib, ExportConfig())
    # photo b has no reasoned score: pairs (3.0, 3.5) and (4.5, 4.0)
    assert rep["fast_vs_reason"] == {**rep["fast_vs_reason"], "n": 2, "srcc": 1.0,
                                     "mean_abs_delta": 0.5}
    assert rep["fast"]["mae_vs_mos"]["bundle"] == pytest.approx((0 + 0.5 + 0.5) / 3, abs=1e-4)


def test_stock_mlx_vlm_loads_and_generates_the_bundle(q4_bundle, prompt, images):
    from mlx_vlm import generate, load

    model, processor = load(str(q4_bundle.out))
    assert isinstance(model.language_model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    stock = generate(model, processor, prompt, image=[images[0]], max_tokens=8,
                     temperature=0.0, verbose=False)
    ours = _greedy(load_bundle(q4_bundle.out), prompt, images[:1], max_tokens=8)[0]
    assert len(stock.token_ids) > 0
    assert list(stock.token_ids) == ours[:len(stock.token_ids)]


def test_stock_processor_applies_the_bundle_pixel_policy(q4_bundle):
    """A plain mlx-vlm processor on the bundle resizes a big image to the manifest's budget."""
    from mlx_vlm import load
    from PIL import Image

    _, processor = load(str(q4_bundle.out))
    img = Image.fromarray((np.random.default_rng(0).random((500, 400, 3)) * 255).astype("uint8"))
    out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[img],
                    padding=False)
    _, h, w = (int(x) for x in out["image_grid_thw"][0])
    policy = PixelPolicy(**SMALL)
    assert (h // 2) * (w // 2) == policy.token_count(img.size)  # 2x2 patches per token
    pp = json.loads((q4_bundle.out / "preprocessor_config.json").read_text())
    assert (pp["min_pixels"], pp["max_pixels"]) == (56 * 56, 112 * 112)


def test_manifest_gives_the_app_prompt_parse_rule_pixels_and_checksums(q4_bundle):
    m = q4_bundle.manifest
    assert json.loads((q4_bundle.out / MANIFEST).read_text()) == m
    assert m["prompt"]["version"] == PROMPT_VERSION and m["prompt"]["user"] == USER_PROMPT
    assert m["response"]["parse_rule"] == PARSE_RULE
    assert m["response"]["score_range"] == [1.0, 5.0]
    assert (m["pixels"]["min_pixels"], m["pixels"]["max_pixels"]) == (56 * 56, 112 * 112)
    assert m["generation"]["reason"]["temperature"] == 0.0
    files = m["files"]
    on_disk = sorted(p.relative_to(q4_bundle.out).as_posix() for p in q4_bundle.out.rglob("*")
                     if p.is_file())
    assert sorted([*files, MANIFEST, MANIFEST_SHA]) == on_disk
    for name, entry in files.items():
        assert entry["sha256"] == sha256_file(q4_bundle.out / name)
    assert m["size_bytes"] == sum(e["size"] for e in files.values())
    for needed in ("config.json", "model.safetensors", "model.safetensors.index.json",
                   "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                   "chat_template.json"):
        assert needed in files
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".py")) for n in files)
    assert m["adapter"]["layers_fused"] == 14 and len(m["adapter"]["sha256"]) == 64
    assert m["base_model"]["revision"] is None
    tol = m["resize_tolerance"]
    assert tol["reference"] == "pil_bicubic_gamma" and tol["images"] == 5
    assert tol["methods"]["pil_bicubic_gamma"]["max_abs_delta"] == 0.0
    assert set(tol["methods"]) == {"pil_bicubic_gamma", "bicubic_linear_light", "lanczos",
                                   "bilinear"}
    assert all(r["mean_abs_pixel_delta"] > 0 for k, r in tol["methods"].items()
               if k != "pil_bicubic_gamma")


def test_base_identity_reads_hf_cache_snapshots(tmp_path):
    snap = tmp_path / "models--Qwen--Qwen2.5-VL-3B-Instruct" / "snapshots" / "0123abcd"
    assert base_identity(snap) == {"id": "Qwen/Qwen2.5-VL-3B-Instruct", "revision": "0123abcd",
                                   "source": "huggingface"}
    assert base_identity(tmp_path / "my-model")["revision"] is None


# --- without an adapter; other quantization modes ------------------------------------------

def test_export_without_adapter(tiny_model_dir, exports):
    res = CliRunner().invoke(app, [
        "export", "--model", str(tiny_model_dir), "--out", str(exports / "plain"),
        "--no-agreement", "--no-progress"])
    assert res.exit_code == 0, res.output
    m = json.loads((exports / "plain" / MANIFEST).read_text())
    assert m["adapter"] is None and m["agreement"] is None
    base, q = _tensors(tiny_model_dir), _tensors(exports / "plain")
    name = "language_model.model.embed_tokens"
    w, _, _ = mx.quantize(base[f"{name}.weight"], group_size=64, bits=4)
    np.testing.assert_array_equal(np.array(q[f"{name}.weight"]), np.array(w))
    assert verify_bundle(exports / "plain").ok


def test_mxfp4_export_loads_and_scores(tiny_model_dir, exports, images):
    out = exports / "mxfp4"
    export_bundle(ExportConfig(model=str(tiny_model_dir), out=str(out), q_mode="mxfp4",
                               agreement=False, **SMALL), progress=False)
    assert json.loads((out / "config.json").read_text())["quantization"] == {
        "group_size": 32, "bits": 4, "mode": "mxfp4"}
    swift = json.loads((out / MANIFEST).read_text())["mlx_swift"]
    assert swift["check"] == "passed" and swift["not_verified_in_mlx_swift"] == ["q_mode mxfp4"]
    (r,) = Scorer(load_bundle(out), ScoreConfig(mode="fast", pixels=PixelPolicy(**SMALL))).score(
        images[:1])
    assert r.error is None and 1.0 <= r.score <= 5.0


@pytest.fixture(scope="module")
def q4_base(tiny_model_dir, exports):
    """An already 4-bit base model folder (a bundle is a plain MLX model folder)."""
    return export_bundle(ExportConfig(model=str(tiny_model_dir), out=str(exports / "q4base"),
                                      agreement=False), progress=False).out


def test_quantized_base_is_dequantized_fused_requantized(q4_base, exports, tmp_path):
    loaded = load_model(str(q4_base))
    mx.random.seed(0)
    cfg = attach_lora(loaded.model, LoraConfig(rank=4, alpha=8))  # QLoRA on the 4-bit base
    mx.random.seed(3)
    for _, m in lora_layers(loaded.model):
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.2
    adapter = save_adapters(loaded.model, cfg, tmp_path / "qlora")
    res = export_bundle(ExportConfig(model=str(q4_base), adapter=str(adapter),
                                     out=str(exports / "from-q4"), agreement=False),
                        progress=False)
    assert res.manifest["quantization"]["requantized_base"] is False
    assert res.manifest["base_model"]["quantization"]["bits"] == 4
    base, out, lora = _tensors(q4_base), _tensors(res.out), mx.load(str(adapter /
                                                                       "adapters.safetensors"))
    # a layer the adapter did not touch keeps its packed weights bit for bit
    for k in ("weight", "scales", "biases"):
        key = f"language_model.model.embed_tokens.{k}"
        np.testing.assert_array_equal(np.array(out[key]), np.array(base[key]))
    # a fused layer is quantize(dequantize(W) + scale * (A @ B)^T)
    name = "language_model.model.layers.0.mlp.up_proj"
    w = mx.dequantize(base[f"{name}.weight"], base[f"{name}.scales"], base[f"{name}.biases"],
                      group_size=64, bits=4)
    w = w + cfg["lora_parameters"]["scale"] * (lora[f"{name}.lora_a"] @ lora[f"{name}.lora_b"]).T
    want, _, _ = mx.quantize(w, group_size=64, bits=4)
    np.testing.assert_array_equal(np.array(out[f"{name}.weight"]), np.array(want))
    # other settings than the base's: everything is dequantized once and quantized again
    res8 = export_bundle(ExportConfig(model=str(q4_base), adapter=str(adapter), bits=8,
                                      out=str(exports / "from-q4-8bit"), agreement=False),
                         progress=False)
    assert res8.manifest["quantization"]["requantized_base"] is True
    assert json.loads((res8.out / "config.json").read_text())["quantization"]["bits"] == 8
    assert load_bundle(res8.out).model is not None


def test_quantize_vision_quantizes_the_tower(tiny_model_dir, exports, images):
    out = exports / "qvision"
    res = export_bundle(ExportConfig(model=str(tiny_model_dir), out=str(out),
                                     quantize_vision=True, agreement=False), progress=False)
    t = _tensors(out)
    assert "vision_tower.blocks.0.attn.qkv.scales" in t
    assert res.manifest["quantization"]["quantize_vision"] is True
    assert res.manifest["mlx_swift"]["not_verified_in_mlx_swift"] == ["quantize_vision"]
    (r,) = Scorer(load_bundle(out), ScoreConfig(mode="fast", pixels=PixelPolicy(**SMALL))).score(
        images[:1])
    assert r.error is None and 1.0 <= r.score <= 5.0


@pytest.mark.parametrize("kw, field", [({"q_mode": "mxfp4", "group_size": 64}, "mxfp4"),
                                       ({"bits": 7}, "bits 7"), ({"q_mode": "nf4"}, "q_mode"),
                                       ({"min_pixels": 10, "max_pixels": 5}, "min_pixels")])
def test_bad_settings_are_one_line_errors(kw, field):
    with pytest.raises(ExportConfigError, match=field):
        ExportConfig(**kw).validate()


# --- verification ------------------------------------------------------------------------------

@pytest.fixture
def copy_of(q4_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(q4_bundle.out, dst)
    return dst


def _refused(folder, name):
    """verify_bundle, load_bundle and `qponder bundle verify` all refuse, naming `name`."""
    result = verify_bundle(folder)
    assert not result.ok and any(name in p for p in result.problems), result.problems
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        load_bundle(folder)
    res = CliRunner().invoke(app, ["bundle", "verify", str(folder), "--no-progress"])
    assert res.exit_code == 1 and name in res.output


def test_verify_passes_an_intact_copy(copy_of):
    result = verify_bundle(copy_of)
    assert result.ok and result.files_checked == len(result.manifest["files"])
    res = CliRunner().invoke(app, ["bundle", "verify", str(copy_of), "--no-progress"])
    assert res.exit_code == 0 and "OK" in res.output


def test_flipped_byte_in_weights_is_refused(copy_of):
    w = copy_of / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    _refused(copy_of, "model.safetensors")
    load_bundle(copy_of, verify=False)  # the opt-out really skips the check


def test_missing_file_is_refused(copy_of):
    (copy_of / "tokenizer_config.json").unlink()
    _refused(copy_of, "tokenizer_config.json")


def test_edited_manifest_is_refused(copy_of):
    m = json.loads((copy_of / MANIFEST).read_text())
    m["files"]["model.safetensors"]["sha256"] = "0" * 64
    (copy_of / MANIFEST).write_text(json.dumps(m, indent=2))
    _refused(copy_of, MANIFEST)


def test_extra_weight_file_is_refused(copy_of):
    shutil.copyfile(copy_of / "model.safetensors", copy_of / "model-extra.safetensors")
    _refused(copy_of, "model-extra.safetensors")


def test_eval_accepts_a_bundle_and_refuses_a_tampered_one(copy_of, cc0_labels):
    args = ["eval", "--bundle", str(copy_of), "--data", str(cc0_labels), "--mode", "fast",
            "--limit", "3", "--min-pixels", str(56 * 56), "--max-pixels", str(112 * 112)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "n 3/3" in res.output
    (copy_of / "config.json").write_text("{}")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "config.json" in res.output


def test_bundle_info_summarises_without_hashing_weights(copy_of):
    res = CliRunner().invoke(app, ["bundle", "info", str(copy_of)])
    assert res.exit_code == 0, res.output
    assert "4-bit affine, group 64" in res.output and "14 layers fused" in res.output


# --- never a half bundle -------------------------------------------------------------------

def test_existing_folder_is_refused_without_force(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = CliRunner().invoke(app, ["export", "--model", str(tiny_model_dir), "--out", str(out),
                                   "--no-agreement", "--no-progress"])
    assert res.exit_code == 2 and "--force" in res.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    res = CliRunner().invoke(app, ["export", "--model", str(tiny_model_dir), "--out", str(out),
                                   "--no-agreement", "--no-progress", "--force"])
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and verify_bundle(out).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # old copy removed


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_export_leaves_nothing_behind(tiny_model_dir, tmp_path, monkeypatch,
                                                  existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    written = []

    def boom(src, dst):  # weights and config are already in the temp folder by now
        written.extend(p.name for p in dst.iterdir())
        raise OSError("disk full")

    monkeypatch.setattr(bundle_mod, "_copy_side_files", boom)
    with pytest.raises(OSError, match="disk full"):
        export_bundle(ExportConfig(model=str(tiny_model_dir), out=str(out), agreement=False,
                                   force=True), progress=False)
    assert "model.safetensors" in written
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])


def test_out_may_not_be_the_base_model(tiny_model_dir):
    from qponder_mlx.model import ModelLoadError

    with pytest.raises(ModelLoadError, match="overwrite the input"):
        export_bundle(ExportConfig(model=str(tiny_model_dir), out=str(tiny_model_dir),
                                   force=True, agreement=False), progress=False)


@pytest.mark.slow
def test_stock_mlx_vlm_server_answers_from_the_bundle(q4_bundle, cc0_labels):
    """`mlx_vlm.server --model BUNDLE` serves a chat completion (4-6 s to start: slow mark)."""
    import base64
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "mlx_vlm.server", "--model", str(q4_bundle.out),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        img = base64.b64encode((cc0_labels.parent / "images" / "chelsea_noise_1.png")
                               .read_bytes()).decode()
        body = {"model": str(q4_bundle.out), "max_tokens": 8, "temperature": 0, "messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}},
                {"type": "text", "text": USER_PROMPT}]}]}
        req = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert reply["usage"]["completion_tokens"] == 8
        assert reply["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_score_takes_the_bundle_pixel_policy_unless_told(copy_of, tmp_path):
    """`qponder score --bundle` scores at the pixels the bundle was exported and checked with."""
    import sqlite3

    from qponder_mlx.testing.sft_sets import CC0_IMAGES

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(CC0_IMAGES.iterdir())[:2]:
        shutil.copyfile(p, photos / p.name)

    def identities(db, *flags):
        res = CliRunner().invoke(app, ["score", str(photos), "--bundle", str(copy_of), "--db",
                                       str(db), "--mode", "fast", "--no-progress", *flags])
        assert res.exit_code == 0, res.output
        with sqlite3.connect(db) as con:
            return {r[0] for r in con.execute("SELECT identity FROM results")}

    def px(ids):  # the pixel policy's part of each identity
        return {p for i in ids for p in i.split(":") if p.startswith("px")}

    assert px(identities(tmp_path / "a.db")) == {f"px{56 * 56}-{112 * 112}"}
    told = identities(tmp_path / "b.db", "--min-pixels", str(28 * 28), "--max-pixels",
                      str(56 * 56))
    assert px(told) == {f"px{28 * 28}-{56 * 56}"}

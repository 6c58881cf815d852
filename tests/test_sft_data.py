"""SFT data: the loss mask, inference-identical encoding, padding, bad rows, data order."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image

from qponder_mlx import generate as gen
from qponder_mlx.images import PixelPolicy, load_image
from qponder_mlx.prompts import chat_messages
from qponder_mlx.scoring import ScoreConfig, Scorer
from qponder_mlx.testing.sft_sets import CC0_IMAGES, cc0_sft_rows, sft_row, write_jsonl
from qponder_mlx.train.data_order import DataOrder
from qponder_mlx.train.sft import sft_loss, sft_loss_sum
from qponder_mlx.train.sft_rows import (
    SFTDataError,
    collate,
    encode_row,
    problem_summary,
    read_sft_rows,
)

ANSWER = "<think>The photo is sharp and well focused.</think><answer>4.20</answer>"


def _rows(tmp_path, tokenizer, pixels, rows, max_seq_len=4096):
    return read_sft_rows(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, pixels, max_seq_len)


def test_mask_keeps_exactly_the_answer_and_im_end(tmp_path, tiny_loaded, small_pixels):
    tok, proc = tiny_loaded.tokenizer, tiny_loaded.processor
    img = sorted(CC0_IMAGES.iterdir())[0]
    (row,), problems = _rows(tmp_path, tok, small_pixels, [sft_row(img, ANSWER)])
    assert problems == []
    enc = encode_row(proc, row, small_pixels)
    batch = collate([enc], tok.pad_token_id)
    ids = np.array(batch.input_ids[0])
    pos = np.array(batch.positions)
    targets = ids[pos + 1]
    np.testing.assert_array_equal(targets, np.array(batch.targets))
    # decoding the supervised tokens gives the answer and its closing <|im_end|>, nothing else
    assert tok.decode(targets.tolist()) == ANSWER + "<|im_end|>"
    # everything before them is masked: system, user text, all image tokens, the assistant header
    prompt_part = tok.decode(ids[:pos[0] + 1].tolist())
    assert prompt_part.endswith("<|im_start|>assistant\n")
    assert int((ids[:pos[0] + 1] == tiny_loaded.model.config.image_token_id).sum()) == \
        small_pixels.token_count(Image.open(img).size) > 0
    assert len(ids) == row.length  # the up-front length estimate is exact


def test_training_prompt_is_the_scoring_prompt(tmp_path, tiny_loaded, small_pixels):
    """Training sees exactly the tokens and pixels that `Scorer` feeds the model."""
    tok, proc = tiny_loaded.tokenizer, tiny_loaded.processor
    img = sorted(CC0_IMAGES.iterdir())[3]
    (row,), _ = _rows(tmp_path, tok, small_pixels, [sft_row(img, ANSWER)])
    enc = encode_row(proc, row, small_pixels)
    scorer = Scorer(tiny_loaded, ScoreConfig(pixels=small_pixels))
    ref = gen.encode(proc, [scorer.prompt], [small_pixels.resize(load_image(img))])
    n = ref["input_ids"].shape[1]
    assert enc.n_prompt == n
    np.testing.assert_array_equal(enc.input_ids[:n], np.array(ref["input_ids"][0]))
    assert mx.array_equal(enc.pixel_values, ref["pixel_values"])
    assert mx.array_equal(enc.image_grid_thw, ref["image_grid_thw"])


def test_padding_does_not_change_a_rows_loss(tmp_path, tiny_loaded, small_pixels):
    """Rows of different lengths batched with right padding: each row's summed loss equals its
    loss alone (batch size 1), and the batch mean is the token-weighted mean of the rows."""
    tok, proc = tiny_loaded.tokenizer, tiny_loaded.processor
    imgs = sorted(CC0_IMAGES.iterdir())
    long = ("<think>" + "The image is blurry, soft and out of focus. " * 4
            + "</think><answer>1.50</answer>")
    rows, _ = _rows(tmp_path, tok, PixelPolicy(56 * 56, 112 * 112),
                    [sft_row(imgs[0], ANSWER), sft_row(imgs[7], long)])
    pixels = PixelPolicy(56 * 56, 112 * 112)
    encs = [encode_row(proc, r, pixels) for r in rows]
    assert len(encs[0].input_ids) != len(encs[1].input_ids)  # padding really happens
    m = tiny_loaded.model
    singles = [sft_loss_sum(m, collate([e], tok.pad_token_id)).item() for e in encs]
    both = collate(encs, tok.pad_token_id)
    assert both.n_supervised == sum(collate([e], 0).n_supervised for e in encs)
    np.testing.assert_allclose(sft_loss_sum(m, both).item(), sum(singles), rtol=1e-5)
    # the mean is over assistant tokens of the whole batch
    np.testing.assert_allclose(sft_loss(m, both).item(), sum(singles) / both.n_supervised,
                               rtol=1e-5)


@pytest.mark.parametrize("rows, want", [
    ([[1, 2, 3, 9, 5], [1, 2, 3, 9, 6, 7]], 3),   # up to the image token
    ([[1, 2, 3, 4], [1, 7, 3, 4]], 1),            # up to the first difference
    ([[1, 2, 3], [1, 2, 3, 4]], 3),               # the shorter row, all shared
    ([[9, 2], [9, 2]], 0),                        # an image token first
])
def test_shared_prefix_by_hand(rows, want):
    assert gen.shared_prefix([np.array(r) for r in rows], image_token_id=9) == want
    assert gen.shared_prefix(rows, image_token_id=9) == want  # plain lists (scoring's PrefixCache)


def test_shared_prefix_gives_the_full_rows_loss_and_gradient(tmp_path, tiny_loaded):
    """Three rows of different lengths (different photos, answers, image sizes): running their
    common prefix once gives the loss and every gradient of running each row in full."""
    from mlx.utils import tree_flatten

    tok, proc, m = tiny_loaded.tokenizer, tiny_loaded.processor, tiny_loaded.model
    imgs = sorted(CC0_IMAGES.iterdir())
    pixels = PixelPolicy(56 * 56, 112 * 112)
    long = "<think>" + "Soft edges, some blocking. " * 3 + "</think><answer>2.35</answer>"
    rows, _ = _rows(tmp_path, tok, pixels, [sft_row(imgs[0], ANSWER), sft_row(imgs[3], long),
                                            sft_row(imgs[7], ANSWER)])
    encs = [encode_row(proc, r, pixels) for r in rows]
    image = m.config.image_token_id
    plain, shared = collate(encs, tok.pad_token_id), collate(encs, tok.pad_token_id,
                                                             image_token_id=image)
    first_image = int(np.argmax(encs[0].input_ids == image))
    assert plain.shared_prefix == 0 and 10 < shared.shared_prefix == first_image
    assert collate(encs[:1], tok.pad_token_id, image_token_id=image).shared_prefix == 0
    grad = nn.value_and_grad(m, sft_loss_sum)
    (la, ga), (lb, gb) = grad(m, plain), grad(m, shared)
    np.testing.assert_allclose(lb.item(), la.item(), rtol=1e-5)
    flat_a, flat_b = dict(tree_flatten(ga)), dict(tree_flatten(gb))
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        a, b = np.array(flat_a[k]), np.array(flat_b[k])
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * max(1.0, np.abs(a).max()),
                                   err_msg=k)
    # the prefix's own weights do get gradient (through the repeated keys/values)
    emb = flat_b["language_model.model.embed_tokens.weight"]
    assert float(mx.abs(emb[int(encs[0].input_ids[1])]).max()) > 0


def test_loss_matches_an_independent_full_forward(tmp_path, tiny_loaded, small_pixels):
    """Our position-gathered CE equals log-softmax of the stock model's full logits."""
    tok, proc, m = tiny_loaded.tokenizer, tiny_loaded.processor, tiny_loaded.model
    (row,), _ = _rows(tmp_path, tok, small_pixels,
                      [sft_row(sorted(CC0_IMAGES.iterdir())[5], ANSWER)])
    enc = encode_row(proc, row, small_pixels)
    ids = mx.array(enc.input_ids)[None]
    logits = m(ids, enc.pixel_values, image_grid_thw=enc.image_grid_thw).logits[0]
    lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    t = np.arange(enc.n_prompt - 1, len(enc.input_ids) - 1)
    expected = -lp[t, enc.input_ids[t + 1]].mean()
    got = sft_loss(m, collate([enc], tok.pad_token_id)).item()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_bad_rows_are_skipped_counted_and_explained(tmp_path, tiny_loaded, small_pixels):
    tok = tiny_loaded.tokenizer
    img = sorted(CC0_IMAGES.iterdir())[0]
    no_assistant = {"images": [str(img)], "messages": chat_messages()}
    huge = sft_row(img, "<think>" + "noise " * 400 + "</think><answer>2.00</answer>")
    rows = [
        sft_row(img, ANSWER, row_id="good"),
        sft_row(tmp_path / "missing.jpg", ANSWER),
        no_assistant,
        huge,
        '{"images": ["x.jpg"], "messages": [',  # broken JSON
        sft_row(img, ANSWER) | {"images": [str(img), str(img)]},
        sft_row(tmp_path / "not_an_image.jpg", ANSWER),
    ]
    (tmp_path / "not_an_image.jpg").write_text("hello")
    good, problems = _rows(tmp_path, tok, small_pixels, rows, max_seq_len=512)
    assert [r.id for r in good] == ["good"]
    kinds = [p.kind for p in problems]
    assert kinds == ["image", "no_assistant", "too_long", "json", "format", "image"]
    assert [p.line for p in problems] == [2, 3, 4, 5, 6, 7]
    for p in problems:
        assert "\n" not in str(p) and "d.jsonl line" in str(p)
    assert "missing.jpg: no such file" in str(problems[0])
    assert "max_seq_len 512" in problems[2].message
    assert problem_summary(len(good), problems) == \
        "1 usable rows, 6 skipped (1 format, 2 image, 1 json, 1 no_assistant, 1 too_long)"


def test_relative_image_paths_resolve_against_the_jsonl_folder(tmp_path, tiny_loaded,
                                                                small_pixels):
    img = tmp_path / "imgs" / "a.png"
    img.parent.mkdir()
    Image.new("RGB", (90, 70), (10, 200, 30)).save(img)
    (row,), problems = _rows(tmp_path, tiny_loaded.tokenizer, small_pixels,
                             [sft_row("imgs/a.png", ANSWER)])
    assert problems == [] and row.image.resolve() == img.resolve()


def test_missing_file_is_a_clear_error(tmp_path, tiny_loaded, small_pixels):
    with pytest.raises(SFTDataError, match="no such data file"):
        read_sft_rows(tmp_path / "none.jsonl", tiny_loaded.tokenizer, small_pixels, 2048)


def test_data_order_is_reproducible_and_resumable():
    lengths = [100 + (i * 37) % 50 for i in range(23)]
    a = DataOrder(lengths, 4, seed=1)
    seq = [a.next() for _ in range(20)]
    # each epoch covers every row exactly once
    epoch0 = [i for b in seq[:6] for i in b]
    assert sorted(epoch0) == list(range(23))
    # same seed, same order; a different seed, a different one
    same, other = DataOrder(lengths, 4, seed=1), DataOrder(lengths, 4, seed=2)
    assert [same.next() for _ in range(20)] == seq
    assert [other.next() for _ in range(20)] != seq
    # resuming from a saved state (through JSON) continues the same sequence
    b = DataOrder(lengths, 4, seed=1)
    first = [b.next() for _ in range(9)]
    c = DataOrder(lengths, 4, seed=1, state=json.loads(json.dumps(b.state())))
    assert first + [c.next() for _ in range(11)] == seq


def test_rows_from_cc0_all_parse(tmp_path, tiny_loaded, small_pixels):
    rows, problems = _rows(tmp_path, tiny_loaded.tokenizer, small_pixels, cc0_sft_rows(6))
    assert len(rows) == 6 and not problems
    assert all(r.mos is not None for r in rows)


def test_cached_tower_features_give_the_models_own_loss_and_gradient(tmp_path, tiny_model_dir):
    """With LoRA on the language model only, the tower's features are computed once per image
    (per image, not per batch) and the loss and gradients equal the model's own computation;
    a trainable tower (train_vision) gets no cache."""
    from mlx.utils import tree_flatten

    from qponder_mlx.model import load_model
    from qponder_mlx.train.config import LoraConfig
    from qponder_mlx.train.image_features import tower_features
    from qponder_mlx.train.lora import attach_lora
    from qponder_mlx.train.sft import Encoder

    loaded = load_model(str(tiny_model_dir))
    m, proc, tok = loaded.model, loaded.processor, loaded.tokenizer
    mx.random.seed(0)
    attach_lora(m, LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    pixels = PixelPolicy(56 * 56, 112 * 112)
    imgs = sorted(CC0_IMAGES.iterdir())
    rows, _ = _rows(tmp_path, tok, pixels, [sft_row(imgs[i], ANSWER) for i in (0, 3, 0, 7)])
    features = tower_features(m, 16)
    assert features is not None and tower_features(m, 0) is None
    plain, cached = Encoder(proc, rows, pixels, 0), Encoder(proc, rows, pixels, 0,
                                                            features=features)
    grad = nn.value_and_grad(m, sft_loss_sum)
    for idx in ([0, 1], [2, 3]):  # row 2 is row 0's image again: served from the cache
        a, b = plain(idx), cached(idx)
        assert a.image_features is None and b.image_features.shape[0] == \
            int((a.input_ids == m.config.image_token_id).sum())
        (la, ga), (lb, gb) = grad(m, a), grad(m, b)
        np.testing.assert_allclose(lb.item(), la.item(), rtol=1e-5)
        for (k, x), (_, y) in zip(tree_flatten(ga), tree_flatten(gb)):
            np.testing.assert_allclose(np.array(y), np.array(x), rtol=1e-3, atol=1e-6, err_msg=k)
    assert features.computed == 3  # three distinct images
    fresh = load_model(str(tiny_model_dir)).model
    attach_lora(fresh, LoraConfig(rank=4, target_modules=["q_proj"], train_vision=True))
    assert tower_features(fresh, 16) is None


MLX_VLM_ROW_ANSWER = "<think>Sharp, fine noise.</think><answer>3.10</answer>"


def _mlx_vlm_row(image, **extra) -> dict:
    """A row in mlx-vlm's own dataset shape: string contents plus an `images` list."""
    return {"images": [str(image)], "messages": [
        {"role": "user", "content": "Rate this photo."},
        {"role": "assistant", "content": MLX_VLM_ROW_ANSWER}], **extra}


@pytest.mark.parametrize("model_type, image_first", [("qwen2_5_vl", True), ("qwen2_vl", False)])
def test_mlx_vlm_dataset_rows_train_on_mlx_vlms_own_prompt(tmp_path, tiny_loaded, small_pixels,
                                                          model_type, image_first):
    """The image goes where mlx-vlm's trainer puts it: the prompt equals the one mlx-vlm's prompt
    helper renders with num_images=1, and the supervised tokens are the answer + <|im_end|>."""
    from mlx_vlm.prompt_utils import apply_chat_template

    tok, proc = tiny_loaded.tokenizer, tiny_loaded.processor
    img = sorted(CC0_IMAGES.iterdir())[2]
    (row,), problems = read_sft_rows(write_jsonl(tmp_path / "d.jsonl", [_mlx_vlm_row(img)]),
                                     tok, small_pixels, 4096, model_type=model_type)
    assert problems == []
    messages = [{"role": "user", "content": "Rate this photo."}]
    expected = apply_chat_template(proc, {"model_type": model_type}, messages,
                                   add_generation_prompt=True, num_images=1)
    assert row.prompt == expected
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    user_turn = (f"<|im_start|>user\n{vision}Rate this photo.<|im_end|>" if image_first
                 else f"<|im_start|>user\nRate this photo.{vision}<|im_end|>")
    assert user_turn in row.prompt
    enc = encode_row(proc, row, small_pixels)
    batch = collate([enc], tok.pad_token_id)
    assert tok.decode(np.array(batch.targets).tolist()) == MLX_VLM_ROW_ANSWER + "<|im_end|>"
    assert len(enc.input_ids) == row.length


def test_mlx_vlm_rows_conversations_key_and_text_parts(tmp_path, tiny_loaded, small_pixels):
    """mlx-vlm also reads `conversations` and text-only part lists; an image part in two
    messages is ambiguous and skipped with a one-line reason."""
    tok = tiny_loaded.tokenizer
    img = sorted(CC0_IMAGES.iterdir())[0]
    conv = _mlx_vlm_row(img)
    conv["conversations"] = conv.pop("messages")
    parts = _mlx_vlm_row(img)
    parts["messages"][0]["content"] = [{"type": "text", "text": "Rate this photo."}]
    two = {"images": [str(img)], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": MLX_VLM_ROW_ANSWER}]}
    rows, problems = _rows(tmp_path, tok, small_pixels, [conv, parts, two])
    assert len(rows) == 2 and rows[0].prompt == rows[1].prompt
    assert [p.kind for p in problems] == ["format"] and "several messages" in str(problems[0])

"""The expected-value read-out of a reasoning answer (`ScoreConfig(readout="expected")`)."""

import math

import mlx.core as mx
import numpy as np
import pytest

from qponder_mlx import generate as gen
from qponder_mlx.evaluate import evaluate
from qponder_mlx.images import PixelPolicy, load_image
from qponder_mlx.labels import Sample
from qponder_mlx.model import load_model
from qponder_mlx.prompts import chat_messages
from qponder_mlx.readout import expected_answer
from qponder_mlx.scoring import ScoreConfig, Scorer
from qponder_mlx.testing.sft_sets import CC0_IMAGES, sft_row, write_jsonl
from qponder_mlx.train.config import SFTConfig, load_config
from qponder_mlx.train.sft import run_sft

# Fake token ids: digit d is token 100 + d, "." is 50, anything else is text.
DIGITS = [100 + d for d in range(10)]
DOT = 50


def _ids(s: str) -> list[int]:
    return [DOT if ch == "." else 100 + int(ch) if ch.isdigit() else 7 for ch in s]


def _watch(n: int, at: dict[int, dict[int, float]]) -> list[list[float]]:
    """log p over the 10 digits at each of n positions; `at[pos] = {digit: p}` (rest spread)."""
    rows = []
    for t in range(n):
        p = np.full(10, 1e-12)
        for d, v in at.get(t, {5: 1.0}).items():
            p[d] = v
        rows.append(np.log(p).tolist())
    return rows


def test_expected_answer_equals_a_hand_computed_value():
    ids = _ids("xx3.72")  # the answer's digits sit at positions 2, 4, 5
    watch = _watch(6, {2: {3: 0.5, 4: 0.3, 2: 0.1, 0: 0.1},  # '0' is not a leading digit
                       4: {7: 0.6, 8: 0.4}, 5: {2: 0.5, 4: 0.5}})
    # lead renormalised over 1..5: (0.5·3 + 0.3·4 + 0.1·2) / 0.9; decimals 7.4 and 3.0
    want = (1.5 + 1.2 + 0.2) / 0.9 + 7.4 / 10 + 3.0 / 100
    assert expected_answer(ids, watch, 3.72, DIGITS, DOT) == pytest.approx(want, abs=1e-9)


def test_the_answer_is_the_last_run_that_spells_the_written_number():
    ids = _ids("a4.5b2.0c4.5d")  # reasoning mentions 4.5 and 2.0; the answer is the last 4.5
    watch = _watch(len(ids), {1: {4: 1.0}, 9: {2: 1.0}, 11: {9: 1.0}})
    # only the run at positions 9..11 counts: lead 2 (watch says so), decimal 9
    assert expected_answer(ids, watch, 4.5, DIGITS, DOT) == pytest.approx(2.9)
    assert expected_answer(ids, watch, 3.3, DIGITS, DOT) is None  # not among the tokens
    assert expected_answer(ids, watch, None, DIGITS, DOT) is None
    # a lone leading digit counts; the result is clipped to the scale
    assert expected_answer(_ids("x5"), _watch(2, {1: {5: 1.0}}), 5.0, DIGITS,
                           DOT) == pytest.approx(5.0)
    assert expected_answer(_ids("5.99"), _watch(4, {0: {5: 1.0}, 2: {9: 1.0}, 3: {9: 1.0}}),
                           5.99, DIGITS, DOT) == 5.0  # 5.99 clipped


def test_watched_logprobs_equal_a_full_forward(tiny_loaded):
    m, proc = tiny_loaded.model, tiny_loaded.processor
    prompt = proc.tokenizer.apply_chat_template(chat_messages(), tokenize=False,
                                                add_generation_prompt=True)
    rng = np.random.default_rng(5)
    from PIL import Image

    img = Image.fromarray((rng.random((84, 112, 3)) * 255).astype("uint8"))
    watch_ids = [3, 17, 40]
    (c,), = gen.generate_rows(m, proc, [prompt], [img], gen.SamplingConfig(max_tokens=8),
                              watch_ids=watch_ids)
    inputs = gen.encode(proc, [prompt], [img])
    ids = mx.concatenate([inputs["input_ids"], mx.array([c.token_ids])], axis=1)
    logits = m(ids, inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits
    lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]
    L = inputs["input_ids"].shape[1]
    full = [[lp[L - 1 + i, w] for w in watch_ids] for i in range(len(c.token_ids))]
    np.testing.assert_allclose(c.watch, full, atol=1e-4)
    (plain,), = gen.generate_rows(m, proc, [prompt], [img], gen.SamplingConfig(max_tokens=8))
    assert plain.watch is None and plain.token_ids == c.token_ids  # watching changes nothing


ANSWERS = ["<think>The photo is sharp and well focused.</think><answer>4.27</answer>",
           "<think>The image is blurry, soft and out of focus.</think><answer>1.53</answer>"]
SMALL = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}


@pytest.fixture(scope="module")
def answering(tmp_path_factory, tiny_model_dir):
    """The tiny model taught (SFT, LoRA) to answer two photos in the format, with decimals."""
    tmp = tmp_path_factory.mktemp("readout")
    images = sorted(CC0_IMAGES.iterdir())
    pics = [images[0], images[13]]
    data = write_jsonl(tmp / "two.jsonl", [sft_row(p, a) for p, a in zip(pics, ANSWERS)])
    cfg = load_config(SFTConfig, None, {
        "model": str(tiny_model_dir), "data": str(data), "out": str(tmp / "run"),
        "batch_size": 2, "warmup": 0, "learning_rate": 1e-3, "iters": 30,
        "lr_schedule": "constant", "steps_per_report": 10, "steps_per_save": 1000,
        "progress": False, **SMALL})
    run_sft(cfg)
    return load_model(str(tiny_model_dir), tmp / "run" / "adapters"), pics


def _by_hand(loaded, scorer, path, text):
    """E[answer] from a no-cache forward pass over prompt + the greedy answer's tokens."""
    tok = loaded.tokenizer
    img = PixelPolicy(**SMALL).resize(load_image(path))
    inputs = gen.encode(loaded.processor, [scorer.prompt], [img])
    answer = tok.encode(text, add_special_tokens=False)
    ids = mx.concatenate([inputs["input_ids"], mx.array([answer])], axis=1)
    logits = loaded.model(ids, inputs["pixel_values"],
                          image_grid_thw=inputs["image_grid_thw"]).logits
    p = np.array(mx.softmax(logits[0].astype(mx.float32), axis=-1))
    L = inputs["input_ids"].shape[1]
    digit = {tok.convert_tokens_to_ids(str(d)): d for d in range(10)}
    num = text.split("<answer>")[1].split("</answer>")[0]  # "4.27"
    start = len(tok.encode(text.split("<answer>")[0] + "<answer>", add_special_tokens=False))
    assert [digit.get(t) for t in answer[start:start + 4]] == [int(num[0]), None,
                                                                int(num[2]), int(num[3])]
    row = lambda k: p[L - 1 + start + k]  # noqa: E731 — distribution that wrote answer token k
    ids_of = sorted(digit, key=digit.get)
    lead = row(0)[ids_of][1:6]
    value = (lead / lead.sum()) @ np.arange(1, 6)
    for k, pos in ((1, 2), (2, 3)):
        q = row(pos)[ids_of]
        value += (q / q.sum()) @ np.arange(10) / 10 ** k
    return float(value)


def test_scorer_reads_the_expected_answer_and_keeps_the_written_one(answering):
    loaded, pics = answering
    text_scorer = Scorer(loaded, ScoreConfig(pixels=PixelPolicy(**SMALL), batch_size=2))
    exp_scorer = Scorer(loaded, ScoreConfig(pixels=PixelPolicy(**SMALL), batch_size=2,
                                            readout="expected"))
    plain = text_scorer.score(pics)
    soft = exp_scorer.score(pics)
    assert [r.text for r in plain] == ANSWERS  # the taught answers, written in full
    assert [r.score for r in plain] == [4.27, 1.53] == [r.written for r in soft]
    for r, path, text in zip(soft, pics, ANSWERS):
        assert r.text == text
        want = _by_hand(loaded, exp_scorer, path, text)
        assert r.score == pytest.approx(want, abs=2e-4)
        assert not math.isclose(r.score, r.written, abs_tol=1e-3)  # it is not the written number
    assert exp_scorer.identity == text_scorer.identity + ":expected"


def test_eval_report_holds_both_readouts(answering):
    loaded, pics = answering
    samples = [Sample(id=f"s{i}", image=p, mos=m) for i, (p, m) in enumerate(zip(pics, [4.0, 2.0]))]
    samples += [Sample(id="s2", image=pics[1], mos=1.0)]
    cfg = {"pixels": PixelPolicy(**SMALL), "batch_size": 2}
    text = evaluate(Scorer(loaded, ScoreConfig(**cfg)), samples, progress=False)
    soft = evaluate(Scorer(loaded, ScoreConfig(**cfg, readout="expected")), samples,
                    progress=False)
    assert text.readout == "text" and text.metrics_written is None
    assert soft.readout == "expected" and soft.metrics_written == text.metrics
    assert [s["written_score"] for s in soft.samples] == [s["score"] for s in text.samples]
    assert "written answers: SRCC" in soft.headline()


def test_expected_readout_is_for_reason_mode_only():
    with pytest.raises(ValueError, match="readout 'expected' is for reason mode"):
        ScoreConfig(mode="fast", readout="expected")
    with pytest.raises(ValueError, match="readout must be one of"):
        ScoreConfig(readout="mean")

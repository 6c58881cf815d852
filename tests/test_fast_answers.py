"""Fast-mode cold-start rows: the copy's prompt + answer tokens start with exactly the tokens the
scorer sends in fast mode, end with the row's own number rounded to a whole level, and the share
chosen is seeded."""

from qponder_mlx.images import PixelPolicy
from qponder_mlx.prompts import FAST_ANSWER_PREFIX, parse_response
from qponder_mlx.scoring import ScoreConfig, Scorer
from qponder_mlx.testing.sft_sets import cc0_sft_rows, write_jsonl
from qponder_mlx.train.fast_answers import chosen, whole_level, with_fast_answers
from qponder_mlx.train.sft_rows import read_sft_rows

SMALL = PixelPolicy(56 * 56, 112 * 112)


def test_fast_copies_match_what_fast_mode_sends(tiny_loaded, tmp_path):
    tok = tiny_loaded.tokenizer
    data = write_jsonl(tmp_path / "d.jsonl", cc0_sft_rows(12))
    rows, _ = read_sft_rows(data, tok, SMALL, 4096)
    out = with_fast_answers(rows, tok, 1.0, seed=0)
    fast = out[len(rows):]
    assert len(fast) == len(rows) and all(f.id.endswith("#fast") for f in fast)
    scorer = Scorer(tiny_loaded, ScoreConfig(mode="fast", pixels=SMALL))
    sent = tok.encode(scorer.prompt, add_special_tokens=False)  # fast mode's prompt, whole
    for row, f in zip(rows, fast):
        ids = tok.encode(f.prompt, add_special_tokens=False) + f.answer_ids
        assert ids[:len(sent)] == sent            # the scorer's exact prefix, token for token
        text = tok.decode(f.answer_ids)
        assert text.startswith(FAST_ANSWER_PREFIX) and text.endswith("</answer><|im_end|>")
        own = parse_response(tok.decode(row.answer_ids).removesuffix("<|im_end|>")).score
        assert parse_response(text.removesuffix("<|im_end|>")).score == int(own + 0.5)
        assert f.length - len(f.answer_ids) == row.length - len(row.answer_ids)
    assert with_fast_answers(rows, tok, 0.0, seed=0) == rows


def test_whole_levels_round_half_up_within_1_to_5():
    assert [whole_level(x) for x in (1.0, 1.49, 2.5, 3.72, 4.5, 4.99, 5.0)] == [1, 1, 3, 4, 5, 5, 5]


def test_the_share_is_seeded_by_id_not_by_order():
    ids = [f"img{i}" for i in range(2000)]
    picked = [i for i in ids if chosen(i, 0.25, seed=3)]
    assert 0.22 < len(picked) / len(ids) < 0.28
    assert picked == [i for i in reversed(ids) if chosen(i, 0.25, seed=3)][::-1]
    assert picked != [i for i in ids if chosen(i, 0.25, seed=4)]


def test_fast_copies_match_fast_mode_with_the_real_qwen2_tokenizer(bf16_3b, tmp_path):
    """The same property with Qwen's own vocabulary, where BPE merges differ from the tiny
    model's (the real-layout 3B fixture's tokenizer and chat template)."""
    from transformers import AutoTokenizer

    from qponder_mlx.prompts import chat_messages

    tok = AutoTokenizer.from_pretrained(str(bf16_3b))
    data = write_jsonl(tmp_path / "d.jsonl", cc0_sft_rows(6))
    rows, _ = read_sft_rows(data, tok, SMALL, 4096)
    fast = with_fast_answers(rows, tok, 1.0, seed=0)[len(rows):]
    assert len(fast) == len(rows)
    prompt = tok.apply_chat_template(chat_messages(), tokenize=False, add_generation_prompt=True)
    sent = tok.encode(prompt + FAST_ANSWER_PREFIX, add_special_tokens=False)
    for f in fast:
        assert (tok.encode(f.prompt, add_special_tokens=False) + f.answer_ids)[:len(sent)] == sent

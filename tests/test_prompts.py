"""The one parse rule for `<think>…</think><answer>X.XX</answer>`."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qponder_mlx.prompts import (
    PROMPT_VERSION,
    USER_PROMPT,
    answer_number_span,
    format_response,
    parse_response,
)


@pytest.mark.parametrize("text, score, ok, reasoning", [
    ("<think>sharp, clean</think><answer>3.72</answer>", 3.72, True, "sharp, clean"),
    ("  <think>\n a \n</think>\n<answer> 4 </answer>\n", 4.0, True, "a"),
    ("<think>x</think><answer>1.00</answer>", 1.0, True, "x"),
    ("<think>x</think><answer>5</answer>", 5.0, True, "x"),
    ("<think>x</think><answer>.5</answer>", None, False, "x"),  # 0.5 is outside [1, 5]
    ("<think>x</think><answer>5.01</answer>", None, False, "x"),  # never clamped
    ("<think>x</think><answer>0.99</answer>", None, False, "x"),
    ("<think>x</think><answer>3.5 stars</answer>", None, False, "x"),  # only a number
    ("<think>x</think><answer>-3</answer>", None, False, "x"),
    ("<think>x</think>", None, False, "x"),  # no answer
    ("<answer>3.1</answer>", 3.1, False, None),  # no think block: score kept, format not ok
    ("<think>x</think><answer>3.1</answer> trailing", 3.1, False, "x"),
    ("lead <think>x</think><answer>3.1</answer>", 3.1, False, "x"),
    ("<think>x</think><answer>2</answer><answer>4.5</answer>", 4.5, False, "x"),  # last answer
    ("<think>a<think>b</think><answer>3</answer>", 3.0, False, "a<think>b"),  # nested open tag
    ("<think>x</think><think>y</think><answer>3</answer>", 3.0, False, "x"),
    ("<answer>3</answer><think>x</think>", 3.0, False, "x"),  # wrong order
    ("The score is 4.2", None, False, None),  # never guessed from free text
    ("", None, False, None),
])
def test_parse_table(text, score, ok, reasoning):
    p = parse_response(text)
    assert p.score == score
    assert p.format_ok is ok
    assert p.reasoning == reasoning


def test_format_response_round_trips():
    text = format_response("  noisy shadows ", 2.345)
    assert text.startswith("<think>noisy shadows</think><answer>2.3")
    p = parse_response(text)
    assert p.format_ok and p.reasoning == "noisy shadows" and abs(p.score - 2.345) < 0.006


def test_prompt_names_the_dimensions_and_format():
    for word in ("sharpness", "noise", "exposure", "colour", "compression", "composition",
                 "<think>", "<answer>"):
        assert word in USER_PROMPT
    assert PROMPT_VERSION


@given(st.text(max_size=200))
def test_parse_never_raises_and_score_in_range(text):
    p = parse_response(text)
    assert p.score is None or 1.0 <= p.score <= 5.0
    assert not p.format_ok or p.score is not None


@given(st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=80),
       st.floats(min_value=1.0, max_value=5.0))
def test_well_formed_answers_always_parse(reasoning, score):
    p = parse_response(format_response(reasoning, score))
    assert p.format_ok
    assert p.score == pytest.approx(round(score, 2))
    assert p.reasoning == reasoning.strip()


@pytest.mark.parametrize("text, number, decimals", [
    ("<think>a</think><answer>3.72</answer>", "3.72", "72"),
    ("<think>a</think><answer> 4.3", "4.3", "3"),  # cut off before the closing tag: still found
    ("<think>2.5 looks</think><answer>1.05</answer>", "1.05", "05"),  # the answer's, not the
    ("<answer>2.1</answer><answer>4.55</answer>", "4.55", "55"),  # reasoning's; the last block
    ("<think>a</think><answer>4</answer>", "4", None),  # no point
    ("<think>a</think><answer>4.</answer>", "4", None),  # a point, no decimals
    ("<think>a</think><answer>good</answer>", None, None),  # no number
    ("<think>3.2</think>", None, None),  # no answer block
])
def test_answer_number_span(text, number, decimals):
    for part, want in (("number", number), ("decimals", decimals)):
        span = answer_number_span(text, part)
        assert (None if span is None else text[span[0]:span[1]]) == want, part
    with pytest.raises(ValueError, match="part"):
        answer_number_span(text, "digits")

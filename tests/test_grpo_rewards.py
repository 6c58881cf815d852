"""Reward tables (hand-computed) and the blind re-scoring judge."""

import math

import mlx.core as mx
import numpy as np
import pytest
from scipy.stats import norm

from qponder_mlx.grpo import judge as J
from qponder_mlx.grpo.rewards import (
    RewardConfig,
    accuracy_reward,
    combine,
    consistency_reward,
    format_reward,
    rank_reward,
)
from qponder_mlx.prompts import parse_response

NAN = float("nan")


def test_accuracy_reward_tables():
    s = np.array([3.0, 3.3, 3.4, 2.0, NAN])
    mos = np.full(5, 3.0)
    np.testing.assert_array_equal(accuracy_reward(s, mos, "threshold"), [1, 1, 0, 0, 0])
    np.testing.assert_allclose(accuracy_reward(s, mos, "laplace"),
                               [1, math.exp(-1), math.exp(-0.4 / 0.3), math.exp(-1 / 0.3), 0])
    np.testing.assert_allclose(accuracy_reward(s, mos, "gaussian", tau=0.5),
                               [1, math.exp(-0.18), math.exp(-0.32), math.exp(-2), 0])


def test_format_and_consistency_rewards():
    parsed = [parse_response(t) for t in ("<think>a</think><answer>3</answer>",
                                          "<answer>3</answer>", "junk")]
    np.testing.assert_array_equal(format_reward(parsed), [1, 0, 0])
    np.testing.assert_allclose(consistency_reward(np.array([3.5, NAN, 2.0]),
                                                  np.array([3.0, 3.0, NAN]), tau=0.5),
                               [math.exp(-1), 0, 0])


def test_rank_reward_hand_computed():
    scores = np.array([[4.0, 2.0], [3.0, 3.0]])  # image 0: mu 3 var 1 ; image 1: mu 3 var 0
    mos = np.array([4.0, 2.0])  # image 0 is better
    r = rank_reward(scores, mos, gamma=0.0)
    p0 = norm.cdf((np.array([4.0, 2.0]) - 3.0) / 1.0)  # g = 1 -> fidelity sqrt(p)
    p1 = norm.cdf((np.array([3.0, 3.0]) - 3.0) / 1.0)  # g = 0 -> fidelity sqrt(1 - p)
    np.testing.assert_allclose(r, [np.sqrt(p0), np.sqrt(1 - p1)])
    assert rank_reward(np.array([[3.0, 4.0]]), np.array([3.0])).tolist() == [[0.0, 0.0]]


def test_combine_weights_the_components():
    parsed = [parse_response(t) for t in ("<think>a</think><answer>3.3</answer>", "x")]
    cfg = RewardConfig(format_weight=0.5, accuracy="threshold", consistency_weight=2.0,
                       consistency_tau=0.5)
    total, parts = combine(parsed, [3.0, 3.0], 2, cfg, text_scores=np.array([3.3, NAN]))
    assert parts["format"].tolist() == [1, 0]
    assert parts["accuracy"].tolist() == [1, 0]
    assert parts["consistency"].tolist() == [1, 0]
    np.testing.assert_allclose(total, [0.5 + 1 + 2, 0])
    with pytest.raises(ValueError, match="judge"):
        combine(parsed, [3.0, 3.0], 2, cfg)
    with pytest.raises(ValueError, match="accuracy"):
        RewardConfig(accuracy="cosine")


def _reference_blind_score(model, tok, reasoning, decimals=True):
    """One unpadded row through the stock model call; softmax over the digits by hand; for the
    decimal, a second call with the most likely leading digit and the dot appended."""
    ids = tok.encode(J.judge_texts(tok, [reasoning])[0], add_special_tokens=False)

    def probs(row, chars):
        # mlx-vlm's language model caches positions from its last image prompt; clear them so
        # the stock call computes text-only positions itself.
        model.language_model._position_ids = model.language_model._rope_deltas = None
        logits = np.array(model.language_model(mx.array([row])).logits[0, -1].astype(mx.float32))
        z = logits[[tok.encode(c, add_special_tokens=False)[0] for c in chars]]
        return np.exp(z - z.max()) / np.exp(z - z.max()).sum()

    lead = probs(ids, "12345")
    value = float((lead * np.arange(1, 6)).sum())
    if decimals:
        d = str(int(lead.argmax()) + 1)
        row = ids + [tok.encode(c, add_special_tokens=False)[0] for c in (d, ".")]
        value += float((probs(row, "0123456789") * np.arange(10)).sum()) / 10
    return min(max(value, 1.0), 5.0)


def test_digits_value_hand_example():
    from qponder_mlx.readout import digits_value

    # lead 3 or 4 at 3:1 -> 3.25; first decimal 9 or 5 at 1:1 -> 0.7; second decimal 0 -> 0
    lead = np.array([0, 0, 3, 1, 0.0])
    dec = np.zeros(10)
    dec[[9, 5]] = 1
    assert digits_value(lead, [dec]) == pytest.approx(3.25 + 0.7)
    assert digits_value(lead, [dec, np.eye(10)[0]]) == pytest.approx(3.95)
    assert digits_value(lead) == pytest.approx(3.25)
    # batched rows, and the clip at 5: 5 + 0.9
    both = digits_value(np.array([lead, np.eye(5)[4]]), [np.array([dec, np.eye(10)[9]])])
    np.testing.assert_allclose(both, [3.95, 5.0])


def test_common_prefix_len_leaves_every_row_a_token():
    assert J.common_prefix_len([[1, 2, 3], [1, 2, 4]]) == 2
    assert J.common_prefix_len([[1, 2], [1, 2, 3]]) == 1  # row 0 keeps its last token
    assert J.common_prefix_len([[1, 2, 3]]) == 2
    assert J.common_prefix_len([[5]]) == 0
    assert J.common_prefix_len([[1, 9], [2, 9]]) == 0


def test_blind_scores_batched_equals_one_by_one(tiny_loaded):
    m, tok = tiny_loaded.model, tiny_loaded.tokenizer
    # Row 4 is row 0's start: the rows' shared head (run once, its keys/values repeated) then
    # reaches into the reasoning itself.
    rs = ["sharp and clean, well exposed", None, "heavy noise in the shadows and strong JPEG "
          "blocking, soft focus", "", "sharp and clean"]
    got = J.blind_scores_vlm(m, tok, rs)
    lead_only = J.blind_scores_vlm(m, tok, rs, decimals=False)
    np.testing.assert_allclose(J.blind_scores_vlm(m, tok, rs, share_prefix=False), got,
                               atol=1e-4)
    assert np.isnan(got[1]) and np.isnan(got[3])
    for i in (0, 2, 4):
        assert got[i] == pytest.approx(_reference_blind_score(m, tok, rs[i]), abs=1e-4)
        assert lead_only[i] == pytest.approx(_reference_blind_score(m, tok, rs[i], False),
                                             abs=1e-4)
        assert 1.0 <= got[i] <= 5.0
        assert got[i] > lead_only[i] or got[i] == 5.0  # the decimal adds what the floor drops
    assert got[0] != pytest.approx(got[2], abs=1e-6)  # the text matters



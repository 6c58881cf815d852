"""GRPO advantages and loss against hand-computed values (TRL's definitions)."""

import math

import mlx.core as mx
import numpy as np
import pytest

from qponder_mlx.grpo import group_advantages, grpo_loss

EPS = 1e-4


def test_group_advantages_group_scale():
    a = np.array(group_advantages(mx.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3))
    # group 1: mean 2, unbiased std 1 ; group 2: all equal -> zeros, never NaN
    np.testing.assert_allclose(a, [-1 / (1 + EPS), 0, 1 / (1 + EPS), 0, 0, 0], atol=1e-6)


def test_group_advantages_batch_and_none_scale():
    r = mx.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    std = math.sqrt(15.5 / 5)  # unbiased std over all six rewards (mean 3.5)
    np.testing.assert_allclose(np.array(group_advantages(r, 3, scale="batch")),
                               np.array([-1, 0, 1, 0, 0, 0]) / (std + EPS), atol=1e-6)
    np.testing.assert_allclose(np.array(group_advantages(r, 3, scale="none")),
                               [-1, 0, 1, 0, 0, 0], atol=1e-6)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(mx.array([1.0, 2.0, 3.0]), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(mx.array([1.0, 2.0]), 2, scale="global")


# ratios r, advantages A = [1, -2], mask drops the last token of row 0
R = np.array([[1.5, 1.0, 0.5], [1.1, 0.7, 2.0]])
A = mx.array([1.0, -2.0])
MASK = mx.array([[1, 1, 0], [1, 1, 1]])
LOGPS = mx.array(np.log(R), dtype=mx.float32)
OLD = mx.zeros((2, 3))
# per-token loss by hand, eps 0.2: row0: -1.2, -1.0, (masked) ; row1: 2.2, 1.6, 4.0
HAND = {"grpo": ((-1.2 - 1.0) / 2 + (2.2 + 1.6 + 4.0) / 3) / 2,
        "bnpo": 5.6 / 5, "dapo": 5.6 / 5, "dr_grpo": 5.6 / (2 * 4)}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_grpo_loss_variants_hand_computed(loss_type):
    loss, m = grpo_loss(LOGPS, OLD, None, MASK, A, loss_type=loss_type,
                        max_completion_length=4)
    assert loss.item() == pytest.approx(HAND[loss_type], rel=1e-5)
    # one low-clipped token (r=0.7, A<0) and one high-clipped (r=1.5, A>0) out of 5
    assert m["clip_ratio_low"].item() == pytest.approx(0.2)
    assert m["clip_ratio_high"].item() == pytest.approx(0.2)
    assert m["clip_ratio"].item() == pytest.approx(0.4)
    assert "kl" not in m


def test_asymmetric_clip_changes_only_the_high_side():
    loss, m = grpo_loss(LOGPS, OLD, None, MASK, A, epsilon_high=0.6, loss_type="bnpo")
    # row0 t0: r=1.5 no longer clipped -> -1.5 instead of -1.2
    assert loss.item() == pytest.approx((5.6 - 0.3) / 5, rel=1e-5)
    assert m["clip_ratio_high"].item() == 0.0


def test_kl_term_is_the_k3_estimator():
    beta = 0.04
    ref = mx.zeros((2, 3))  # d = ref - logp = -log r ; kl = exp(d) - d - 1 = 1/r + log r - 1
    kl = 1 / R + np.log(R) - 1
    mask = np.array(MASK)
    loss, m = grpo_loss(LOGPS, OLD, ref, MASK, A, beta=beta, loss_type="bnpo")
    assert loss.item() == pytest.approx((5.6 + beta * (kl * mask).sum()) / 5, rel=1e-5)
    assert m["kl"].item() == pytest.approx((kl * mask).sum() / 5, rel=1e-5)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(LOGPS, OLD, None, MASK, A, beta=beta)


def test_on_policy_gradient_is_the_policy_gradient():
    """At ratio 1 (old = stop_gradient(logp)) d loss / d logp_t = -A / n_tokens (bnpo)."""
    logp = mx.array([[-1.0, -2.0], [-0.5, -0.3]])
    adv = mx.array([0.5, -1.5])
    mask = mx.array([[1, 1], [1, 0]])

    def f(lp):
        return grpo_loss(lp, mx.stop_gradient(lp), None, mask, adv, loss_type="bnpo")[0]

    g = np.array(mx.grad(f)(logp))
    np.testing.assert_allclose(g, [[-0.5 / 3, -0.5 / 3], [1.5 / 3, 0.0]], atol=1e-6)


def test_dr_grpo_needs_a_length_and_unknown_type_fails():
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(LOGPS, OLD, None, MASK, A, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(LOGPS, OLD, None, MASK, A, loss_type="ppo")

"""grpo_coherence.py: the coherence estimate (hand examples, a simulated signal + noise)
and the batch gradient it is built on (GRPO's gradient of one rollout, replayed by its seed)."""

from __future__ import annotations

import importlib

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from qponder_mlx.grpo.config import GRPOConfig
from qponder_mlx.model import load_model
from qponder_mlx.prompts import chat_messages
from qponder_mlx.train.config import LoraConfig
from qponder_mlx.train.lora import adapters_disabled, attach_lora


@pytest.fixture(scope="module")
def coh():
    return importlib.import_module("grpo_coherence")


def test_coherence_hand_examples(coh):
    # two gradients: <g1, g2> / mean |g|^2 = 3 / ((2 + 5) / 2)
    assert coh.coherence(np.array([[1.0, 1.0], [1.0, 2.0]])) == pytest.approx(6 / 7)
    assert coh.coherence(np.array([[1.0, 0.0], [0.0, 1.0]])) == 0.0  # no shared direction
    assert coh.coherence(np.array([[1.0, 0.0], [-1.0, 0.0]])) == -1.0
    assert coh.coherence(np.tile([0.3, -2.0, 1.0], (4, 1))) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        coh.coherence(np.ones((1, 3)))


def test_coherence_recovers_the_signal_share_and_its_batch_scaling(coh):
    # g_i = s + n_i with |s|^2 = 1 and E|n|^2 = 3: ρ -> 1/4, and half signal at 16 * 3 = 48
    # images for a 16-image batch; averaging 3 batches' noise (a 48-image step) gives ρ -> 1/2.
    rng = np.random.default_rng(0)
    d, n = 4000, 399
    s = rng.normal(size=d)
    s /= np.linalg.norm(s)
    noise = rng.normal(size=(n, d)) * np.sqrt(3.0 / d)
    rho = coh.coherence(s + noise)
    assert rho == pytest.approx(0.25, abs=0.02)
    assert coh.images_for_half_signal(rho, 16) == pytest.approx(48, rel=0.1)
    big = s + noise.reshape(n // 3, 3, d).mean(axis=1)
    assert coh.coherence(big) == pytest.approx(0.5, abs=0.04)
    assert coh.images_for_half_signal(0.0, 16) == float("inf")



def test_coherence_se_matches_the_spread_of_repeated_estimates(coh):
    # 20 batches of a 500-weight gradient, ρ = 1/4, drawn 60 times: the jackknife SE of one
    # draw should match the SD of the 60 estimates
    rng = np.random.default_rng(1)
    d = 500
    s = rng.normal(size=d)
    s /= np.linalg.norm(s)
    draws = [s + rng.normal(size=(20, d)) * np.sqrt(3.0 / d) for _ in range(60)]
    rhos = [coh.coherence(g) for g in draws]
    se = np.mean([coh.coherence_se(g) for g in draws])
    assert np.mean(rhos) == pytest.approx(0.25, abs=0.03)
    assert 0.67 < se / np.std(rhos) < 1.5, (se, np.std(rhos))
    with pytest.raises(ValueError):
        coh.coherence_se(np.ones((2, 3)))


def _setup(model_dir):
    lm = load_model(str(model_dir))
    mx.random.seed(0)
    attach_lora(lm.model, LoraConfig(rank=8, alpha=16))
    prompt = lm.tokenizer.apply_chat_template(chat_messages(), tokenize=False,
                                              add_generation_prompt=True)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray((rng.random((56, 56, 3)) * 255).astype("uint8")) for _ in range(2)]
    return lm, prompt, imgs


def test_batch_gradient_replays_its_rollout_and_is_linear_in_the_advantages(coh, tiny_model_dir):
    lm, prompt, imgs = _setup(tiny_model_dir)
    # β = 0: the loss is -A·ratio per token, so negating every reward negates the gradient
    cfg = GRPOConfig(data="-", group_size=4, max_completion_length=8, beta=0.0,
                     temperature=1.0, max_rows=64)
    before = {k: np.asarray(v) for k, v in _flat(lm.model).items()}

    def reward(sign):
        def fn(ro, parsed, mos):
            r = sign * np.array([len(t) + m for t, m in zip(ro.texts, mos)], dtype=float)
            return r, {"r": r}
        return fn

    g1, t1 = coh.batch_gradient(lm.model, lm.processor, prompt, imgs, [1.0, 4.0], cfg,
                                reward(+1), adapters_disabled, seed=7)
    g2, t2 = coh.batch_gradient(lm.model, lm.processor, prompt, imgs, [1.0, 4.0], cfg,
                                reward(+1), adapters_disabled, seed=7)
    gneg, t3 = coh.batch_gradient(lm.model, lm.processor, prompt, imgs, [1.0, 4.0], cfg,
                                  reward(-1), adapters_disabled, seed=7)
    assert t1 == t2 == t3 and np.linalg.norm(g1) > 0
    np.testing.assert_allclose(g2, g1, rtol=1e-6, atol=1e-9)  # one seed, one rollout
    np.testing.assert_allclose(gneg, -g1, rtol=1e-4, atol=1e-7)
    # another seed samples other completions and gives another gradient
    g4, t4 = coh.batch_gradient(lm.model, lm.processor, prompt, imgs, [1.0, 4.0], cfg,
                                reward(+1), adapters_disabled, seed=8)
    assert t4 != t1 and not np.allclose(g4, g1)
    # the model is left as it was: nothing was applied
    after = _flat(lm.model)
    assert all(np.array_equal(before[k], np.asarray(after[k])) for k in before)


def _flat(model):
    from mlx.utils import tree_flatten
    return dict(tree_flatten(model.trainable_parameters()))

"""A GRPO step learns an easy reward on the tiny model, and does not with the sign flipped."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from PIL import Image

from qponder_mlx.grpo import rollout as R
from qponder_mlx.grpo.config import GRPOConfig
from qponder_mlx.grpo.step import grpo_step
from qponder_mlx.model import load_model
from qponder_mlx.prompts import chat_messages
from qponder_mlx.train.config import LoraConfig
from qponder_mlx.train.lora import adapters_disabled, attach_lora


def _setup(model_dir, seed=0):
    lm = load_model(str(model_dir))
    mx.random.seed(seed)
    attach_lora(lm.model, LoraConfig(rank=16, alpha=64))
    prompt = lm.tokenizer.apply_chat_template(chat_messages(), tokenize=False,
                                              add_generation_prompt=True)
    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray((rng.random((56, 56, 3)) * 255).astype("uint8")) for _ in range(2)]
    return lm, prompt, imgs


def _low_id_fraction(ro):
    """Share of sampled tokens with id < 280: about half under the random model, learnable."""
    return np.array([np.mean([t < 280 for t in c.token_ids]) for g in ro.completions for c in g])


def _train(model_dir, sign, steps=40):
    lm, prompt, imgs = _setup(model_dir)
    cfg = GRPOConfig(data="-", group_size=8, max_completion_length=12, beta=0.0,
                     grad_clip=None, temperature=1.0, max_rows=64)  # both groups in one decode
    opt = optim.Adam(learning_rate=3e-2)

    def reward_fn(ro, parsed, mos):
        r = sign * _low_id_fraction(ro)
        return r, {"low_ids": r}

    hist = []
    for step in range(steps):
        mx.random.seed(100 + step)
        res = grpo_step(lm.model, lm.processor, prompt, imgs, [3.0, 3.0], cfg, opt, reward_fn)
        assert not res.skipped
        hist.append(float(_low_id_fraction(res.rollout).mean()))
    return np.mean(hist[:10]), np.mean(hist[-10:])


def test_mean_reward_rises_and_flipped_sign_does_not(tiny_model_dir):
    before, after = _train(tiny_model_dir, +1.0)
    before_f, after_f = _train(tiny_model_dir, -1.0)
    assert after > before and after_f < before_f, (before, after, before_f, after_f)
    # The two runs start from the same policy (~0.5) and end far apart: a 10-step mean of
    # 192 tokens has SD ~0.011, so 0.06 is ~4 SD of the difference. (The rise alone is the
    # slower side, +0.03..0.05 depending on the BLAS's rounding, too close to noise to pin.)
    assert after - after_f > 0.06, (after, after_f)


def test_adapters_off_reference_equals_a_fresh_base(tiny_model_dir):
    lm, prompt, imgs = _setup(tiny_model_dir)
    from mlx.utils import tree_flatten, tree_map
    lm.model.update(tree_map(lambda p: p + 0.05, lm.model.trainable_parameters()))
    fresh = load_model(str(tiny_model_dir))
    from qponder_mlx import generate as gen
    inputs = gen.encode(lm.processor, [prompt], imgs[:1])
    ids = mx.array([[10, 20, 30, 40]])
    with_lora = np.array(R.completion_logps(lm.model, inputs, ids))
    with adapters_disabled(lm.model):
        off = np.array(R.completion_logps(lm.model, inputs, ids))
    base = np.array(R.completion_logps(fresh.model, inputs, ids))
    np.testing.assert_allclose(off, base, atol=1e-6)
    assert not np.allclose(with_lora, base, atol=1e-3)
    assert len(tree_flatten(lm.model.trainable_parameters())) > 0


def test_nan_step_is_skipped_and_weights_unchanged(tiny_model_dir):
    from mlx.utils import tree_flatten

    lm, prompt, imgs = _setup(tiny_model_dir)
    cfg = GRPOConfig(data="-", group_size=4, max_completion_length=6, beta=0.0)
    before = {k: np.array(v) for k, v in tree_flatten(lm.model.trainable_parameters())}

    def nan_reward(ro, parsed, mos):
        r = np.arange(len(ro.texts), dtype=float)
        r[0] = np.nan
        return r, {}

    res = grpo_step(lm.model, lm.processor, prompt, imgs, [3.0, 3.0], cfg,
                    optim.Adam(learning_rate=1e-2), nan_reward)
    assert res.skipped and res.metrics["skipped"] == 1.0
    for k, v in tree_flatten(lm.model.trainable_parameters()):
        np.testing.assert_array_equal(np.array(v), before[k])


def test_group_and_batch_reward_spread_by_hand(tiny_model_dir):
    """reward_group_std is the mean of the groups' unbiased SDs (group scaling's divisors)."""
    lm, prompt, imgs = _setup(tiny_model_dir)
    cfg = GRPOConfig(data="-", group_size=4, max_completion_length=4, beta=0.0)

    def fixed(ro, parsed, mos):
        return np.array([0.0, 1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 5.0]), {}

    res = grpo_step(lm.model, lm.processor, prompt, imgs, [3.0, 3.0], cfg,
                    optim.Adam(learning_rate=1e-3), fixed)
    # SD of 0,1,2,3 with n-1: sqrt(5/3) = 1.2910; the tied group adds 0
    assert res.metrics["reward_group_std"] == pytest.approx(np.sqrt(5 / 3) / 2, rel=1e-6)
    assert res.metrics["reward_std"] == pytest.approx(np.std([0, 1, 2, 3, 5, 5, 5, 5]), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_per_image_accumulation_equals_the_full_batch_loss(tiny_model_dir, loss_type):
    """Σ over images of the chunked loss == grpo_loss on all rows at once."""
    from qponder_mlx import generate as gen
    from qponder_mlx.grpo.loss import grpo_loss, per_token_terms, reduce_tokens

    lm, prompt, imgs = _setup(tiny_model_dir)
    mx.random.seed(5)
    ro = R.rollout(lm.model, lm.processor, prompt, imgs, 3,
                   gen.SamplingConfig(max_tokens=5, temperature=1.0))
    width = max(len(c.token_ids) for g in ro.completions for c in g)
    batch = [R.pad_completions(g, 0, width) for g in ro.completions]
    lps = [R.completion_logps(lm.model, ro.inputs[i], batch[i][0]) for i in range(2)]
    adv = mx.array([0.5, -1.0, 0.5, 1.0, -0.25, -0.75])
    rng = np.random.default_rng(0)  # off-policy by random amounts, so clipping is exercised
    old = [lp - mx.array(rng.normal(0, 0.3, lp.shape), dtype=mx.float32) for lp in lps]
    n_tok = sum(int(m.sum().item()) for _, m in batch)
    chunked = 0.0
    for i in range(2):
        pt, _ = per_token_terms(lps[i], old[i], None, adv[i * 3:(i + 1) * 3], beta=0.0,
                                epsilon_low=0.2, epsilon_high=0.2)
        chunked += reduce_tokens(pt, batch[i][1], loss_type, n_rows=6, n_tokens=n_tok,
                                 max_completion_length=8).item()
    full, _ = grpo_loss(mx.concatenate(lps), mx.concatenate(old), None,
                        mx.concatenate([m for _, m in batch]), adv, loss_type=loss_type,
                        max_completion_length=8)
    assert chunked == pytest.approx(full.item(), rel=1e-5)


@pytest.mark.parametrize("rows", [1, 2])
def test_chunked_gradient_equals_the_one_pass_gradient(tiny_model_dir, rows):
    """loss_rows < G (prompt once, completions in chunks, one VJP through the prompt) gives the
    gradient of the single backward pass over the whole group."""
    from mlx.utils import tree_flatten, tree_map

    from qponder_mlx import generate as gen
    from qponder_mlx.grpo.step import image_loss_and_grads

    lm, prompt, imgs = _setup(tiny_model_dir)
    # non-zero LoRA B so the prompt's path to the loss carries gradient too
    lm.model.update(tree_map(lambda p: p + 0.03, lm.model.trainable_parameters()))
    mx.random.seed(3)
    ro = R.rollout(lm.model, lm.processor, prompt, imgs[:1], 4,
                   gen.SamplingConfig(max_tokens=6, temperature=1.0))
    ids, mask = R.pad_completions(ro.completions[0], 0)
    adv = mx.array([1.0, -0.5, 0.25, -0.75])
    rng = np.random.default_rng(1)
    old = R.completion_logps(lm.model, ro.inputs[0], ids) - mx.array(
        rng.normal(0, 0.2, ids.shape), dtype=mx.float32)
    ref = old + 0.1
    n_tok = int(mask.sum().item())
    results = {}
    # the prompt run again, and the rollout's own prefill state (same weights) reused
    for key, loss_rows, state in ((4, 4, None), (rows, rows, None),
                                  ("state", rows, ro.prompt_states[0])):
        cfg = GRPOConfig(data="-", group_size=4, beta=0.04, loss_rows=loss_rows,
                         max_completion_length=6)
        results[key] = image_loss_and_grads(lm.model, ro.inputs[0], ids, mask, adv, old,
                                            ref, cfg, 4, n_tok, state)
    l1, s1, g1 = results[4]
    for l2, s2, g2 in (results[rows], results["state"]):
        assert l2 == pytest.approx(l1, abs=1e-6)  # the loss is a small sum of +/- terms
        for k in s1:
            assert float(s2[k]) == pytest.approx(float(s1[k]), rel=1e-5)
        a, b = dict(tree_flatten(g1)), dict(tree_flatten(g2))
        scale = max(float(mx.abs(v).max()) for v in a.values())
        assert scale > 0
        for k in a:
            np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), atol=1e-5 * scale,
                                       err_msg=k)


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_the_policy_prompt_is_not_run_again_before_the_first_update(tiny_model_dir, monkeypatch,
                                                                    num_iterations):
    """The first update (and the old-policy log-probs) start from the rollout's prefill state;
    prompts run again only for the KL reference and for updates after the weights changed."""
    from qponder_mlx.grpo import step as S

    lm, prompt, imgs = _setup(tiny_model_dir)
    calls = []
    real = S.prompt_state
    monkeypatch.setattr(S, "prompt_state", lambda m, x: calls.append(1) or real(m, x))
    cfg = GRPOConfig(data="-", group_size=4, beta=0.04, loss_rows=2, max_completion_length=4,
                     num_iterations=num_iterations)
    res = grpo_step(lm.model, lm.processor, prompt, imgs, [2.0, 4.0], cfg,
                    optim.SGD(learning_rate=0.1),
                    lambda ro, parsed, mos: (np.arange(8, dtype=float), {}))
    assert not res.skipped and len(res.rollout.prompt_states) == 2
    # 2 images: the reference's prompts, each update's VJP through the prompts, and the
    # policy's prompts without a graph for updates after the first only (before: 6 / 12 calls)
    assert len(calls) == 2 + 2 * num_iterations + 2 * (num_iterations - 1)


def test_reference_judge_scores_under_the_reference_policy(tiny_model_dir):
    """judge = "reference" re-scores inside the trainer's reference context, and only there."""
    from mlx.utils import tree_map

    from qponder_mlx.grpo.judge import blind_scores_vlm, make_judge

    lm, _, _ = _setup(tiny_model_dir)
    lm.model.update(tree_map(lambda p: p + 0.05, lm.model.trainable_parameters()))
    texts = ["Sharp and clean.", "Heavy blur and strong noise everywhere.", None]
    fresh = load_model(str(tiny_model_dir))
    base = blind_scores_vlm(fresh.model, fresh.tokenizer, texts)
    policy = make_judge("policy", lm.model, lm.tokenizer)(texts)
    ref = make_judge("reference", lm.model, lm.tokenizer, reference=adapters_disabled)(texts)
    np.testing.assert_allclose(ref, base, atol=1e-6, equal_nan=True)
    assert not np.allclose(policy[:2], base[:2], atol=1e-4)   # the adapters matter outside
    assert np.isnan(ref[2])                                   # no reasoning, no score
    with pytest.raises(ValueError, match="reference"):
        make_judge("reference", lm.model, lm.tokenizer)


def test_row_chunks_sort_by_last_counted_token_and_cut_each_chunk():
    from qponder_mlx.grpo.step import row_chunks

    mask = mx.array([[1, 1, 1, 0, 0, 0],    # last counted token at 3
                     [1, 1, 1, 1, 1, 0],    # 5
                     [1, 0, 0, 0, 0, 0],    # 1
                     [0, 0, 0, 0, 0, 0],    # nothing counted: width 1, goes first
                     [1, 0, 1, 0, 0, 0]])   # 3 (a masked answer token inside counts as a gap)
    got = [(c.tolist(), w) for c, w in row_chunks(mask, 2)]
    assert got == [([2, 3], 1), ([0, 4], 3), ([1], 5)]
    assert [(c.tolist(), w) for c, w in row_chunks(mask, 5)] == [([2, 3, 0, 4, 1], 5)]


@pytest.mark.parametrize("loss_rows", [1, 2, 4])
def test_chunks_cut_to_length_give_the_full_width_loss_and_gradient(tiny_model_dir, loss_rows):
    """Completions of very different lengths (a group padded to its longest): the chunked,
    length-cut gradient and the reference log-probs equal a plain full-width computation."""
    from mlx.utils import tree_flatten, tree_map

    from qponder_mlx import generate as gen
    from qponder_mlx.grpo import step as S

    lm, prompt, imgs = _setup(tiny_model_dir)
    lm.model.update(tree_map(lambda p: p + 0.03, lm.model.trainable_parameters()))
    inputs = gen.encode(lm.processor, [prompt], [imgs[0]])
    rng = np.random.default_rng(2)
    ids = mx.array(rng.integers(10, 300, (4, 9)), dtype=mx.int32)
    lengths = [9, 2, 5, 1]
    mask = mx.array([[1] * n + [0] * (9 - n) for n in lengths], dtype=mx.int32)
    mask[2, 3] = 0  # a token left out of the loss inside a row (an answer digit)
    adv = mx.array([1.0, -0.5, 0.25, -0.75])
    cfg = GRPOConfig(data="-", group_size=4, beta=0.04, loss_rows=loss_rows)
    full = R.completion_logps(lm.model, inputs, ids)
    ref = S.frozen_logps(lm.model, inputs, ids, mask, cfg)
    m = np.array(mask) != 0
    np.testing.assert_allclose(np.array(ref)[m], np.array(full)[m], atol=1e-5)
    ref = ref - 0.1 * mx.array(m, dtype=mx.float32)  # the reference differs from the policy
    n_tok = int(mask.sum().item())
    # the plain computation: the whole group at full width in one backward pass
    (l1, _), g1 = nn.value_and_grad(lm.model, S._image_loss)(
        lm.model, inputs, ids, mask, adv, None, ref, cfg, 4, n_tok)
    l2, _, g2 = S.image_loss_and_grads(lm.model, inputs, ids, mask, adv, None, ref, cfg, 4,
                                       n_tok)
    assert l2 == pytest.approx(l1.item(), abs=1e-6)
    a, b = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    scale = max(float(mx.abs(v).max()) for v in a.values())
    assert scale > 0
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), atol=1e-5 * scale, err_msg=k)

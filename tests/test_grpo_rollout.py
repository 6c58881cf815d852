"""Group rollouts and shared-prefix log-probs agree with the unshared computations."""

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from qponder_mlx import generate as gen
from qponder_mlx.grpo import rollout as R
from qponder_mlx.prompts import chat_messages


def _images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in sizes]


@pytest.fixture(scope="module")
def prompt(tiny_loaded):
    return tiny_loaded.tokenizer.apply_chat_template(
        chat_messages(), tokenize=False, add_generation_prompt=True)


def test_rollout_groups_mixed_sizes_in_input_order(tiny_loaded, prompt):
    m, proc = tiny_loaded.model, tiny_loaded.processor
    imgs = _images([(56, 56), (112, 56), (56, 56)])
    ro = R.rollout(m, proc, prompt, imgs, 3, gen.SamplingConfig(max_tokens=6))
    assert [len(g) for g in ro.completions] == [3, 3, 3]
    assert len(ro.texts) == 9
    # greedy: every row of a group equals that image's single greedy answer
    for img, group in zip(imgs, ro.completions):
        (single,), = gen.generate_rows(m, proc, [prompt], [img], gen.SamplingConfig(max_tokens=6))
        assert all(c.token_ids == single.token_ids for c in group)


def test_completion_logps_match_sampling_logprobs_and_full_forward(tiny_loaded, prompt):
    m, proc = tiny_loaded.model, tiny_loaded.processor
    mx.random.seed(1)
    (img,) = _images([(84, 56)], seed=2)
    ro = R.rollout(m, proc, prompt, [img], 4, gen.SamplingConfig(max_tokens=8, temperature=1.0))
    group = ro.completions[0]
    ids, mask = R.pad_completions(group, pad_id=0)
    lp = np.array(R.completion_logps(m, ro.inputs[0], ids))
    for k, c in enumerate(group):
        n = len(c.token_ids)
        np.testing.assert_allclose(lp[k, :n], c.logprobs, atol=2e-4)
        # unshared reference: the stock model call on prompt + completion, one row
        full_ids = mx.concatenate([ro.inputs[0]["input_ids"], mx.array([c.token_ids])], axis=1)
        logits = m(full_ids, ro.inputs[0]["pixel_values"],
                   image_grid_thw=ro.inputs[0]["image_grid_thw"]).logits[0]
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        L = ro.inputs[0]["input_ids"].shape[1]
        ref = [logp[L - 1 + i, tok].item() for i, tok in enumerate(c.token_ids)]
        np.testing.assert_allclose(lp[k, :n], ref, atol=2e-4)
    assert np.array(mask).sum() == sum(len(c.token_ids) for c in group)


def test_completion_logps_temperature_scales_logits(tiny_loaded, prompt):
    m, proc = tiny_loaded.model, tiny_loaded.processor
    (img,) = _images([(56, 56)], seed=3)
    inputs = gen.encode(proc, [prompt], [img])
    ids = mx.array([[5, 9, 11]])
    a = np.array(R.completion_logps(m, inputs, ids, temperature=1.0))
    b = np.array(R.completion_logps(m, inputs, ids, temperature=2.0))
    assert not np.allclose(a, b)
    assert (np.exp(b) > 0).all() and (b <= 0).all()


def test_frozen_tower_runs_once_per_image_and_changes_nothing(tiny_model_dir, prompt):
    """With LoRA on the language model only, the rollout computes each image's features once
    and hands them to every later pass: the sampled tokens (greedy) and the completions'
    log-probs equal those of the model computing the features itself, from the stock call."""
    from qponder_mlx.model import load_model
    from qponder_mlx.train.config import LoraConfig
    from qponder_mlx.train.lora import attach_lora

    loaded = load_model(str(tiny_model_dir))
    m, proc = loaded.model, loaded.processor
    mx.random.seed(0)
    attach_lora(m, LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]))
    imgs = _images([(56, 56), (112, 56), (56, 56)], seed=4)
    ro = R.rollout(m, proc, prompt, imgs, 2, gen.SamplingConfig(max_tokens=6))
    for img, x, group in zip(imgs, ro.inputs, ro.completions):
        own = m.vision_tower(x["pixel_values"], x["image_grid_thw"], output_hidden_states=False)
        np.testing.assert_array_equal(np.array(x["image_features"]), np.array(own))
        (single,), = gen.generate_rows(m, proc, [prompt], [img], gen.SamplingConfig(max_tokens=6))
        assert all(c.token_ids == single.token_ids for c in group)
        ids, _ = R.pad_completions(group, pad_id=0)
        plain = {k: v for k, v in x.items() if k != "image_features"}
        np.testing.assert_allclose(np.array(R.completion_logps(m, x, ids)),
                                   np.array(R.completion_logps(m, plain, ids)), atol=1e-5)

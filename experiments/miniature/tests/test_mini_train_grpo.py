"""train_grpo.py: the miniature's settings on top of the product's `run_grpo` —
`train_decimals` (the answer's decimals out of the loss via `token_mask`), `average_every`
(adapters = the mean of the trajectory, via `on_step` snapshots) and `judge_decimals`."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
import train_grpo
from mlx.utils import tree_flatten, tree_map
from PIL import Image
from train_grpo import MiniatureGRPOConfig, answer_tokens, without_answer_tokens

from qponder_mlx import generate as gen
from qponder_mlx.grpo import rollout as R
from qponder_mlx.grpo import step as S
from qponder_mlx.grpo.config import GRPOConfig
from qponder_mlx.grpo.step import grpo_step
from qponder_mlx.model import load_model
from qponder_mlx.prompts import chat_messages
from qponder_mlx.train.checkpoint import list_checkpoints
from qponder_mlx.train.config import LoraConfig
from qponder_mlx.train.lora import attach_lora

SMALL = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}


def _drop_decimals(mask, group, tok):
    return without_answer_tokens(mask, group, tok, "decimals")


# ---------------------------------------------------------------- train_decimals


@pytest.mark.parametrize("part", ["decimals", "number"])
def test_answer_tokens_are_the_answer_number_only(tiny_loaded, part):
    """The flags cover exactly the tokens of the answer's decimals (or its whole number), and
    the masked copy drops those and keeps padding at 0."""
    tok = tiny_loaded.tokenizer
    head, number, tail = "<think>blur 2.5, noisy</think><answer>", "3.72", "</answer>"
    ids = tok.encode(head + number + tail, add_special_tokens=False)
    flags = answer_tokens(tok, ids, part)
    want = "72" if part == "decimals" else number
    picked = tok.decode([t for t, f in zip(ids, flags) if f])
    assert picked == want and sum(flags) == len(tok.encode(want, add_special_tokens=False))
    whole = tok.encode("<think>2.5</think><answer>4</answer>", add_special_tokens=False)
    # An integer answer has a number but no decimals; the reasoning's 2.5 is never picked.
    assert tok.decode([t for t, f in zip(whole, answer_tokens(tok, whole, part)) if f]) \
        == ("4" if part == "number" else "")
    group = [gen.Completion(ids, [0.0] * len(ids), "stop"),
             gen.Completion(ids[:3], [0.0] * 3, "length")]
    _, mask = R.pad_completions(group, 0)
    kept = without_answer_tokens(mask, group, tok, part)
    assert kept.dtype == mask.dtype
    np.testing.assert_array_equal(np.array(kept[0]), 1 - np.array(flags))
    np.testing.assert_array_equal(np.array(kept[1]), np.array(mask[1]))


def _setup(model_dir, seed=0):
    lm = load_model(str(model_dir))
    mx.random.seed(seed)
    attach_lora(lm.model, LoraConfig(rank=16, alpha=64))
    prompt = lm.tokenizer.apply_chat_template(chat_messages(), tokenize=False,
                                              add_generation_prompt=True)
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((56, 56, 3)) * 255).astype("uint8"))
    return lm, prompt, img


@pytest.mark.parametrize("differ, train_decimals, moves", [
    ("decimals", True, True),
    ("decimals", False, False),
    ("leading", False, True),     # the leading digit is still trained
])
def test_untrained_answer_tokens_get_no_gradient(tiny_model_dir, monkeypatch, differ,
                                                 train_decimals, moves):
    """Two samples that differ only in one part of the answer's number, with opposite
    advantages: every shared token's gradient cancels, so the update is that part's alone —
    none when train_grpo's mask leaves it out of the loss (train_decimals = false)."""
    lm, prompt, img = _setup(tiny_model_dir)
    lm.model.update(tree_map(lambda p: p + 0.03, lm.model.trainable_parameters()))  # B != 0
    tok = lm.tokenizer
    # Cut off at the end of the number, so no token after it sees different context.
    texts = (["<think>sharp</think><answer>3.72", "<think>sharp</think><answer>3.15"]
             if differ == "decimals" else
             ["<think>sharp</think><answer>3.72", "<think>sharp</think><answer>2.72"])
    comps = [gen.Completion(ids, [0.0] * len(ids), "length", t)
             for t in texts for ids in [tok.encode(t, add_special_tokens=False)]]
    inputs = gen.encode(lm.processor, [prompt], [img])
    monkeypatch.setattr(S, "rollout", lambda *a, **k: R.Rollout([inputs], [comps], texts))
    cfg = GRPOConfig(data="-", group_size=2, beta=0.0, grad_clip=None)
    before = {k: np.array(v) for k, v in tree_flatten(lm.model.trainable_parameters())}
    res = grpo_step(lm.model, lm.processor, prompt, [img], [3.7], cfg,
                    optim.SGD(learning_rate=1.0),
                    lambda ro, parsed, mos: (np.array([1.0, 0.0]), {}),
                    token_mask=None if train_decimals else _drop_decimals)
    assert not res.skipped
    moved = max(float(np.abs(np.array(v) - before[k]).max())
                for k, v in tree_flatten(lm.model.trainable_parameters()))
    if moves:
        assert moved > 1e-4
    else:
        assert moved < 1e-6


def test_train_hands_run_grpo_the_mask_and_the_judge_its_settings(tiny_loaded, tmp_path,
                                                                 monkeypatch):
    """What `train` passes on (no training here: run_grpo is replaced by a recorder): the
    decimals mask only with train_decimals = false, the judge's decimals as configured, and the
    done-marker naming adapters/ when nothing was averaged."""
    seen, judged = {}, []
    monkeypatch.setattr(train_grpo, "run_grpo", lambda cfg, **kw: seen.update(kw))
    monkeypatch.setattr(train_grpo, "default_reward_fn", lambda cfg, g, judge: judge)
    monkeypatch.setattr(train_grpo, "blind_scores_vlm",
                        lambda model, tok, texts, decimals: judged.append(decimals))
    tok = tiny_loaded.tokenizer
    ids = tok.encode("<think>x</think><answer>3.72</answer>", add_special_tokens=False)
    group = [gen.Completion(ids, [0.0] * len(ids), "stop")]
    _, mask = R.pad_completions(group, 0)
    for flag in (True, False):
        out = tmp_path / f"run_{flag}"
        train_grpo.train(MiniatureGRPOConfig(model="-", data="-", out=str(out),
                                             train_decimals=flag, judge_decimals=flag),
                         loaded=tiny_loaded)
        if flag:
            assert seen["token_mask"] is None
        else:
            np.testing.assert_array_equal(np.array(seen["token_mask"](mask, group, tok)),
                                          np.array(_drop_decimals(mask, group, tok)))
            assert np.array(seen["token_mask"](mask, group, tok)).sum() < np.array(mask).sum()
        seen["reward_fn"](["some reasoning"])
        assert judged[-1] is flag
        assert json.loads((out / train_grpo.DONE_FILE).read_text()) == {
            "averaged_steps": 0, "adapters_last": str(out / "adapters")}
    bad = MiniatureGRPOConfig(model="-", data="-", out=str(tmp_path / "x"))
    bad.rewards.judge = "reference"
    with pytest.raises(train_grpo.ConfigError, match="judge is the policy"):
        train_grpo.train(bad, loaded=tiny_loaded)


def test_main_refuses_a_negative_average_every_in_one_line(tiny_model_dir, cc0_labels,
                                                          tmp_path, capsys):
    toml = tmp_path / "g.toml"
    toml.write_text("iters = 1\n")
    assert train_grpo.main(["--config", str(toml), "--model", str(tiny_model_dir),
                            "--data", str(cc0_labels), "--out", str(tmp_path / "r"),
                            "--set", "average_every=-2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "average_every must be >= 0" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- average_every


def _low_ids(ro, parsed, mos):
    r = np.array([np.mean([t < 280 for t in c.token_ids]) for g in ro.completions for c in g])
    return r, {"low_ids": r}


def _cfg(tiny_model_dir, cc0_labels, out, iters, average_every=0):
    return MiniatureGRPOConfig(model=str(tiny_model_dir), data=str(cc0_labels), out=str(out),
                               iters=iters, batch_size=2, group_size=4, max_completion_length=8,
                               learning_rate=2e-2, beta=0.04, steps_per_save=2, progress=False,
                               lr_schedule="constant", average_every=average_every, **SMALL)


def _weights(folder):
    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


def test_average_every_saves_the_mean_of_the_trajectory_and_resumes_it(
        tiny_model_dir, cc0_labels, tmp_path):
    """The trajectory comes from a plain run that keeps a checkpoint after every step; the
    averaged run trains identically, so its adapters/ must be numpy's mean of steps 2 and 4
    and its adapters_last/ the plain run's last step. A resumed averaged run matches too."""
    plain_cfg = _cfg(tiny_model_dir, cc0_labels, tmp_path / "plain", 4)
    plain_cfg.steps_per_save, plain_cfg.keep_checkpoints = 1, 4
    plain = train_grpo.train(plain_cfg, reward_fn=_low_ids)
    traj = [_weights(p) for p in list_checkpoints(plain)]
    assert len(traj) == 4

    averaged = train_grpo.train(_cfg(tiny_model_dir, cc0_labels, tmp_path / "avg", 4, 2),
                                reward_fn=_low_ids)
    mean, last = _weights(averaged / "adapters"), _weights(averaged / "adapters_last")
    moved = [k for k in mean if "lora_b" in k and np.abs(traj[3][k] - traj[1][k]).max() > 1e-4]
    assert moved  # steps 2 and 4 differ, so the mean is neither of them
    for k in mean:
        np.testing.assert_allclose(mean[k], (traj[1][k] + traj[3][k]) / 2, atol=1e-6)
        np.testing.assert_allclose(last[k], traj[3][k], atol=1e-6)
    marker = json.loads((averaged / train_grpo.DONE_FILE).read_text())
    assert marker["averaged_steps"] == 2 and marker["adapters_last"].endswith("adapters_last")
    # a stock adapter folder: the mean keeps the run's adapter_config.json
    assert (averaged / "adapters" / "adapter_config.json").read_text() == \
        (averaged / "adapters_last" / "adapter_config.json").read_text()

    # stopped after step 2 (its mean already written), resumed to 4: the same mean
    train_grpo.train(_cfg(tiny_model_dir, cc0_labels, tmp_path / "b", 2, 2), reward_fn=_low_ids)
    resumed = train_grpo.train(_cfg(tiny_model_dir, cc0_labels, tmp_path / "b", 4, 2),
                               resume=True, reward_fn=_low_ids)
    for k, v in _weights(resumed / "adapters").items():
        np.testing.assert_allclose(v, mean[k], atol=1e-5)
    for k, v in _weights(resumed / "adapters_last").items():
        np.testing.assert_allclose(v, traj[3][k], atol=1e-5)

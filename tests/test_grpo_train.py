"""`qponder train --stage grpo` end to end: files, resume exactness, bad input."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from qponder_mlx.cli.main import app
from typer.testing import CliRunner

from qponder_mlx.grpo.config import GRPOConfig
from qponder_mlx.grpo.trainer import metric_curve, run
from qponder_mlx.train.checkpoint import list_checkpoints
from qponder_mlx.train.config import ConfigError

SMALL = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}


def _low_ids(ro, parsed, mos):
    r = np.array([np.mean([t < 280 for t in c.token_ids]) for g in ro.completions for c in g])
    return r, {"low_ids": r}


def _cfg(tiny_model_dir, cc0_labels, out, iters):
    return GRPOConfig(model=str(tiny_model_dir), data=str(cc0_labels), out=str(out),
                      iters=iters, batch_size=2, group_size=4, max_completion_length=8,
                      learning_rate=2e-2, beta=0.04, steps_per_save=2, progress=False,
                      lr_schedule="constant", **SMALL)


def _weights(folder):
    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


def _adapters(run_dir):
    return _weights(run_dir / "adapters")


def test_resume_gives_the_same_adapters_as_a_straight_run(tiny_model_dir, cc0_labels, tmp_path):
    straight = run(_cfg(tiny_model_dir, cc0_labels, tmp_path / "a", 4), reward_fn=_low_ids)
    run(_cfg(tiny_model_dir, cc0_labels, tmp_path / "b", 2), reward_fn=_low_ids)
    resumed = run(_cfg(tiny_model_dir, cc0_labels, tmp_path / "b", 4), resume=True,
                  reward_fn=_low_ids)
    a, b = _adapters(straight), _adapters(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5)
    # the adapters moved (the reward had signal), so equality is not trivial
    assert any(np.abs(v).max() > 0 for k, v in a.items() if "lora_b" in k)
    np.testing.assert_allclose(metric_curve(straight), metric_curve(resumed), atol=1e-6)
    assert [p.name for p in list_checkpoints(resumed)] == ["step_0000002", "step_0000004"]


def test_cli_grpo_run_writes_metrics_curves_and_stock_loadable_adapters(
        tiny_model_dir, cc0_labels, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "train", "--stage", "grpo", "--model", str(tiny_model_dir), "--data", str(cc0_labels),
        "--out", str(out), "--iters", "2", "--batch-size", "2", "--min-pixels", "3136",
        "--max-pixels", "12544", "--set", "group_size=3", "--set", "max_completion_length=6",
        "--set", "rewards.accuracy=threshold", "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("reward_mean", "reward_format_mean", "reward_accuracy_mean",
                "reward_consistency_mean", "format_rate", "kl", "clip_ratio",
                "completion_length", "time_rollout", "time_reward", "time_update",
                "peak_memory_gb"):
        assert key in train[0], key
    assert "<svg" in (out / "curves.html").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["group_size"] == 3 and cfg["rewards"]["accuracy"] == "threshold"
    from mlx_vlm import load
    model, _ = load(str(tiny_model_dir), adapter_path=str(out / "adapters"))
    saved = mx.load(str(out / "adapters" / "adapters.safetensors"))
    loaded = dict(tree_flatten(model.parameters()))
    for k, v in saved.items():  # stock mlx-vlm applied exactly our adapter tensors
        np.testing.assert_array_equal(np.array(loaded[k]), np.array(v))


def test_grpo_bad_config_and_data_are_one_line_errors(tiny_model_dir, tmp_path):
    r = CliRunner()
    res = r.invoke(app, ["train", "--stage", "grpo", "--model", str(tiny_model_dir), "--data",
                         str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "none.jsonl" in res.output
    labels = tmp_path / "l.jsonl"
    labels.write_text('{"image": "x.png", "mos": 3}\n')
    res = r.invoke(app, ["train", "--stage", "grpo", "--model", str(tiny_model_dir), "--data",
                         str(labels), "--out", str(tmp_path / "o"), "--set", "group_size=1"])
    assert res.exit_code != 0 and "group_size" in res.output


def test_batch_by_gives_every_step_images_of_one_key(tiny_model_dir, cc0_labels, tmp_path):
    # cc0_mini's MOS is KADID's per (type, level), and no two types share a value
    kind = {4.612: "blur", 2.911: "blur", 1.303: "blur", 3.893: "noise", 3.045: "noise",
            2.301: "noise", 4.338: "jpeg", 3.866: "jpeg", 1.35: "jpeg"}
    seen = []

    def record(ro, parsed, mos):
        seen.append({kind[round(float(m), 3)] for m in mos})
        return _low_ids(ro, parsed, mos)

    cfg = _cfg(tiny_model_dir, cc0_labels, tmp_path / "r", 6)
    cfg.batch_size, cfg.batch_by = 3, r"_(blur|noise|jpeg)_\d$"
    run(cfg, reward_fn=record)
    assert len(seen) == 6 and all(len(s) == 1 for s in seen)
    assert set().union(*seen) != {"blur"}  # the steps do not all come from one key by chance

    cfg.batch_by, cfg.out = "_(blur|noise)_", str(tmp_path / "s")  # JPEG ids do not match
    with pytest.raises(ConfigError, match=r"does not match image id '\w+_jpeg_\d'"):
        run(cfg, reward_fn=record)
    cfg.batch_by = "_(blur"
    with pytest.raises(ConfigError, match="batch_by '_\\(blur' is not a valid regex"):
        cfg.validate()
    assert GRPOConfig(batch_by="_crop\\d+").batch_keys(["a_crop12_x", "b_crop3_y"]) == [
        "_crop12", "_crop3"]  # no group: the whole match is the key


def test_train_only_moves_the_matched_weights_and_no_other(tiny_model_dir, cc0_labels,
                                                           tmp_path):
    start = run(_cfg(tiny_model_dir, cc0_labels, tmp_path / "sft", 2), reward_fn=_low_ids)
    cfg = _cfg(tiny_model_dir, cc0_labels, tmp_path / "head", 3)
    cfg.adapter, cfg.train_only = str(start / "adapters"), r"layers\.1\.self_attn"
    before, after = _adapters(start), _adapters(run(cfg, reward_fn=_low_ids))
    assert before.keys() == after.keys()  # the adapter file still holds every LoRA weight
    head = {k for k in before if "layers.1.self_attn" in k}
    assert head and len(head) < len(before)
    assert all(np.abs(after[k] - before[k]).max() > 0 for k in head)
    for k in before.keys() - head:  # bit for bit: Adam never steps a weight whose grad is 0
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)

    cfg.train_only, cfg.out = "no_such_weight", str(tmp_path / "none")
    with pytest.raises(ConfigError, match="train_only 'no_such_weight' matches none of the"):
        run(cfg, reward_fn=_low_ids)
    cfg.train_only = "lm_head("
    with pytest.raises(ConfigError, match=r"train_only 'lm_head\(' is not a valid regex"):
        cfg.validate()
    cfg.train_only, cfg.weight_decay = "self_attn", 0.01
    with pytest.raises(ConfigError, match="set weight_decay = 0"):
        cfg.validate()


def test_reference_is_the_starting_adapter_also_after_resume(tiny_model_dir, cc0_labels,
                                                              tmp_path):
    """Continuing an adapter (the cold-start path): KL is measured against that adapter —
    0 at the first step — not against the bare base, and resuming keeps that reference."""
    start = run(_cfg(tiny_model_dir, cc0_labels, tmp_path / "sft", 2), reward_fn=_low_ids)

    def cfg(out, iters, reference="initial"):
        c = _cfg(tiny_model_dir, cc0_labels, out, iters)
        c.adapter, c.reference = str(start / "adapters"), reference
        return c

    straight = run(cfg(tmp_path / "a", 4), reward_fn=_low_ids)
    kl = metric_curve(straight, "kl")
    assert abs(kl[0]) < 1e-6 and kl[1:].max() > 1e-6      # policy == reference, then it moves
    base_kl = metric_curve(run(cfg(tmp_path / "base", 1, "base"), reward_fn=_low_ids), "kl")
    assert base_kl[0] > 1e-4                              # the base is not the starting policy
    run(cfg(tmp_path / "b", 2), reward_fn=_low_ids)
    resumed = run(cfg(tmp_path / "b", 4), resume=True, reward_fn=_low_ids)
    a, b = _adapters(straight), _adapters(resumed)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5)
    np.testing.assert_allclose(metric_curve(resumed, "kl"), kl, atol=1e-6)


def test_average_every_saves_the_mean_of_the_trajectory_and_resumes_it(
        tiny_model_dir, cc0_labels, tmp_path):
    """The trajectory comes from a plain run that keeps a checkpoint after every step; the
    averaged run trains identically, so its adapters/ must be numpy's mean of steps 2 and 4
    and its adapters_last/ the plain run's last step. A resumed averaged run matches too."""
    plain_cfg = _cfg(tiny_model_dir, cc0_labels, tmp_path / "plain", 4)
    plain_cfg.steps_per_save, plain_cfg.keep_checkpoints = 1, 4
    plain = run(plain_cfg, reward_fn=_low_ids)
    traj = [_weights(p) for p in list_checkpoints(plain)]
    assert len(traj) == 4

    def cfg(out, iters):
        c = _cfg(tiny_model_dir, cc0_labels, out, iters)
        c.average_every = 2
        return c

    averaged = run(cfg(tmp_path / "avg", 4), reward_fn=_low_ids)
    mean, last = _adapters(averaged), _weights(averaged / "adapters_last")
    moved = [k for k in mean if "lora_b" in k and np.abs(traj[3][k] - traj[1][k]).max() > 1e-4]
    assert moved  # steps 2 and 4 differ, so the mean is neither of them
    for k in mean:
        np.testing.assert_allclose(mean[k], (traj[1][k] + traj[3][k]) / 2, atol=1e-6)
        np.testing.assert_allclose(last[k], traj[3][k], atol=1e-6)
    summary = json.loads((averaged / "summary.json").read_text())
    assert summary["averaged_steps"] == 2 and summary["adapters_last"].endswith("adapters_last")

    run(cfg(tmp_path / "b", 2), reward_fn=_low_ids)  # saves the mean of step 2 in its checkpoint
    resumed = run(cfg(tmp_path / "b", 4), resume=True, reward_fn=_low_ids)
    for k, v in _adapters(resumed).items():
        np.testing.assert_allclose(v, mean[k], atol=1e-5)


def test_expected_readout_gives_every_completion_its_digit_log_probs(tiny_model_dir, cc0_labels,
                                                                      tmp_path):
    seen = []

    def record(ro, parsed, mos):
        seen.extend(c for g in ro.completions for c in g)
        return _low_ids(ro, parsed, mos)

    cfg = _cfg(tiny_model_dir, cc0_labels, tmp_path / "r", 1)
    cfg.rewards.readout = "expected"
    run(cfg, reward_fn=record)
    assert len(seen) == 8 and all(len(c.watch) == len(c.token_ids) for c in seen)
    assert all(len(w) == 10 for c in seen for w in c.watch)  # the ten digits at every position
    seen.clear()
    run(_cfg(tiny_model_dir, cc0_labels, tmp_path / "w", 1), reward_fn=record)
    assert seen and all(c.watch is None for c in seen)       # "written" watches nothing

"""`qponder train --stage grpo` end to end: files, resume exactness, bad input."""

import json

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from qponder_mlx.cli.main import app
from typer.testing import CliRunner

from qponder_mlx.grpo.config import GRPOConfig
from qponder_mlx.grpo.trainer import metric_curve, run_grpo
from qponder_mlx.train.checkpoint import list_checkpoints

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
    straight = run_grpo(_cfg(tiny_model_dir, cc0_labels, tmp_path / "a", 4), reward_fn=_low_ids)
    run_grpo(_cfg(tiny_model_dir, cc0_labels, tmp_path / "b", 2), reward_fn=_low_ids)
    resumed = run_grpo(_cfg(tiny_model_dir, cc0_labels, tmp_path / "b", 4), resume=True,
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


def test_reference_is_the_starting_adapter_also_after_resume(tiny_model_dir, cc0_labels,
                                                              tmp_path):
    """Continuing an adapter (the cold-start path): KL is measured against that adapter —
    0 at the first step — not against the bare base, and resuming keeps that reference."""
    start = run_grpo(_cfg(tiny_model_dir, cc0_labels, tmp_path / "sft", 2), reward_fn=_low_ids)

    def cfg(out, iters, reference="initial"):
        c = _cfg(tiny_model_dir, cc0_labels, out, iters)
        c.adapter, c.reference = str(start / "adapters"), reference
        return c

    straight = run_grpo(cfg(tmp_path / "a", 4), reward_fn=_low_ids)
    kl = metric_curve(straight, "kl")
    assert abs(kl[0]) < 1e-6 and kl[1:].max() > 1e-6      # policy == reference, then it moves
    base_kl = metric_curve(run_grpo(cfg(tmp_path / "base", 1, "base"), reward_fn=_low_ids), "kl")
    assert base_kl[0] > 1e-4                              # the base is not the starting policy
    run_grpo(cfg(tmp_path / "b", 2), reward_fn=_low_ids)
    resumed = run_grpo(cfg(tmp_path / "b", 4), resume=True, reward_fn=_low_ids)
    a, b = _adapters(straight), _adapters(resumed)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5)
    np.testing.assert_allclose(metric_curve(resumed, "kl"), kl, atol=1e-6)


def test_a_run_without_reward_signal_warns_once_with_the_likely_cause(
        tiny_model_dir, cc0_labels, tmp_path, capsys):
    from qponder_mlx.grpo.trainer import NO_SIGNAL_STEPS

    def flat(ro, parsed, mos):  # what a model that never writes the format earns: 0 everywhere
        r = np.zeros(len(ro.texts))
        return r, {"format": r}

    cfg = _cfg(tiny_model_dir, cc0_labels, tmp_path / "flat", NO_SIGNAL_STEPS + 1)
    cfg.max_completion_length, cfg.batch_size, cfg.group_size = 2, 1, 2
    run_grpo(cfg, reward_fn=flat)
    err = capsys.readouterr().err
    assert err.count("every group's rewards were equal") == 1
    assert "no SFT cold start" in err and "--adapter" in err
    cfg = _cfg(tiny_model_dir, cc0_labels, tmp_path / "ok", NO_SIGNAL_STEPS)
    cfg.max_completion_length, cfg.batch_size = 4, 1
    run_grpo(cfg, reward_fn=_low_ids)
    assert "rewards were equal" not in capsys.readouterr().err

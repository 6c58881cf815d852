"""Checkpoints are atomic and complete; metrics log and curves; the guarded update."""

import json
import math
import random

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from qponder_mlx.model import load_model
from qponder_mlx.train import checkpoint as ck
from qponder_mlx.train.config import LoraConfig
from qponder_mlx.train.loop import guarded_update, lr_schedule
from qponder_mlx.train.lora import attach_lora, lora_layers
from qponder_mlx.train.runlog import METRICS_FILE, MetricsLog, svg_chart, write_curves


def _model(path):
    model = load_model(str(path)).model
    mx.random.seed(0)
    cfg = attach_lora(model, LoraConfig(rank=2, alpha=4, target_modules=["q_proj"]))
    return model, cfg


def _train_a_bit(model, opt, steps=2):
    def loss(m):
        return sum((layer.lora_b - 1.0).square().sum() + layer.lora_a.sum()
                   for _, layer in lora_layers(m))

    vg = nn.value_and_grad(model, loss)
    for _ in range(steps):
        v, g = vg(model)
        opt.update(model, g)
        mx.eval(model.parameters(), opt.state)


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path, tiny_model_dir):
    model, cfg = _model(tiny_model_dir)
    opt = optim.AdamW(learning_rate=lr_schedule(1e-2, 10, warmup=2))
    _train_a_bit(model, opt)
    random.seed(5)
    np.random.seed(6)
    path = ck.save_checkpoint(tmp_path, 2, model, cfg, opt, {"data": {"cursor": 3}},
                              {"seed": 0}, keep=2)
    py_next, np_next = random.random(), np.random.random()
    assert path.name == "step_0000002"

    other, _ = _model(tiny_model_dir)
    opt2 = optim.AdamW(learning_rate=lr_schedule(1e-2, 10, warmup=2))
    got = ck.load_latest_checkpoint(tmp_path)
    assert got.step == 2 and got.state["data"] == {"cursor": 3} and got.config == {"seed": 0}
    ck.restore_checkpoint(got, other, opt2)
    a, b = dict(tree_flatten(model.trainable_parameters())), \
        dict(tree_flatten(other.trainable_parameters()))
    for k in a:
        assert mx.array_equal(a[k], b[k]), k
    sa, sb = dict(tree_flatten(opt.state)), dict(tree_flatten(opt2.state))
    assert sa.keys() == sb.keys() and all(mx.array_equal(sa[k], sb[k]) for k in sa)
    assert (random.random(), np.random.random()) == (py_next, np_next)
    # the restored optimizer continues exactly like the original
    _train_a_bit(model, opt, 1)
    _train_a_bit(other, opt2, 1)
    for k, v in dict(tree_flatten(model.trainable_parameters())).items():
        assert mx.array_equal(v, dict(tree_flatten(other.trainable_parameters()))[k])


def test_keeps_last_k_and_ignores_half_written(tmp_path, tiny_model_dir):
    model, cfg = _model(tiny_model_dir)
    opt = optim.AdamW(learning_rate=lr_schedule(1e-2, 10))
    _train_a_bit(model, opt, 1)
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, model, cfg, opt, {}, {}, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]
    # a crash mid-save leaves a hidden temp folder and a folder without state.json: both ignored
    root = tmp_path / ck.CHECKPOINTS
    (root / ".tmp-step_0000009-1").mkdir()
    (root / "step_0000009").mkdir()
    (root / "step_0000009" / "adapters.safetensors").write_bytes(b"partial")
    assert ck.load_latest_checkpoint(tmp_path).step == 4
    ck.save_checkpoint(tmp_path, 5, model, cfg, opt, {}, {}, keep=2)
    assert not (root / ".tmp-step_0000009-1").exists()
    assert ck.load_latest_checkpoint(tmp_path).step == 5
    assert ck.load_latest_checkpoint(tmp_path / "nothing") is None


def test_unreadable_checkpoint_is_one_line(tmp_path):
    d = tmp_path / ck.CHECKPOINTS / "step_0000001"
    d.mkdir(parents=True)
    (d / ck.STATE_FILE).write_text("{torn")
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_latest_checkpoint(tmp_path)
    assert "step_0000001" in str(e.value) and "\n" not in str(e.value)


def test_step_seed_differs_per_step_and_seed():
    seeds = {ck.step_seed(s, t) for s in range(3) for t in range(1, 100)}
    assert len(seeds) == 3 * 99


def test_schedule_warmup_then_cosine():
    sched = lr_schedule(1e-3, iters=10, warmup=2, kind="cosine", min_learning_rate=1e-5)
    got = [sched(mx.array(s)).item() for s in range(11)]
    assert got[0] == 0 and got[1] == pytest.approx(5e-4)
    # after warmup: min + (max - min) * (1 + cos(pi * t / T)) / 2 with T = iters - warmup
    for s in range(2, 11):
        t = s - 2
        want = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * t / 8))
        assert got[s] == pytest.approx(want, rel=1e-5)
    flat = lr_schedule(3e-4, iters=10, kind="constant")
    assert flat(mx.array(7)).item() == pytest.approx(3e-4)


def test_guarded_update_skips_non_finite(tiny_model_dir):
    model, _ = _model(tiny_model_dir)
    opt = optim.AdamW(learning_rate=lr_schedule(1e-2, 10))
    before = {k: mx.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    grads = model.trainable_parameters()
    bad = {k: v for k, v in tree_flatten(grads)}
    name = next(iter(bad))
    from mlx.utils import tree_unflatten

    bad[name] = bad[name] * mx.nan
    applied, norm = guarded_update(model, opt, mx.array(1.0), tree_unflatten(list(bad.items())),
                                   1.0)
    assert not applied and not math.isfinite(norm)
    applied, _ = guarded_update(model, opt, mx.array(mx.inf), grads, 1.0)
    assert not applied
    after = dict(tree_flatten(model.trainable_parameters()))
    assert all(mx.array_equal(before[k], after[k]) for k in before)
    assert opt.step.item() == 0  # the optimizer state did not move either
    applied, norm = guarded_update(model, opt, mx.array(1.0), grads, 1e-3)
    assert applied and math.isfinite(norm) and opt.step.item() == 1
    # the norm is the one mlx's clip_grad_norm reports (the clipping is mlx's own)
    _, want = optim.clip_grad_norm(grads, 1e-3)
    assert norm == pytest.approx(want.item(), rel=1e-6)


def test_metrics_log_resume_drops_rows_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    for s in range(1, 8):
        log.append({"step": s, "kind": "train", "loss": 1.0 / s})
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 8, "kin')  # torn by a crash
    resumed = MetricsLog(tmp_path, resume_step=5)
    assert [r["step"] for r in resumed.rows()] == [1, 2, 3, 4, 5]
    resumed.append({"step": 6, "kind": "train", "loss": float("nan")})
    raw = (tmp_path / METRICS_FILE).read_text().splitlines()[-1]
    assert json.loads(raw)["loss"] is None  # strict JSON, no NaN literal
    MetricsLog(tmp_path)  # a fresh run starts a fresh log
    assert not (tmp_path / METRICS_FILE).exists()


def test_curves_page_draws_the_logged_series(tmp_path):
    log = MetricsLog(tmp_path)
    for s in range(1, 11):
        log.append({"step": s, "kind": "train", "loss": 3.0 / s, "learning_rate": 1e-3,
                    "tokens_per_s": 100.0, "peak_memory_gb": 0.01})
    log.append({"step": 10, "kind": "val", "val_loss": 0.5, "srcc": 0.7, "plcc": 0.8,
                "format_rate": 1.0})
    page = write_curves(tmp_path, "run x").read_text()
    assert page.startswith("<!doctype html>") and page.count("<svg") == 5
    assert "last step 10, loss 0.3000" in page
    # the train-loss line has one vertex per logged step
    chart = svg_chart("t", [("a", [(s, 3.0 / s) for s in range(1, 11)])], log_y=True)
    assert chart.split('points="')[1].split('"')[0].count(",") == 10
    assert "no data yet" in svg_chart("empty", [("a", [])])
    # other trainers (GRPO) pass their own charts: one line per metric key
    page = write_curves(tmp_path, "grpo", charts=[("reward", ["loss", "tokens_per_s"], False),
                                                  ("nothing", ["absent"], False)]).read_text()
    assert page.count("<svg") == 2 and page.count("<polyline") == 2 and "no data yet" in page

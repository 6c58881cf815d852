"""`qponder dev tiny-model` + `qponder eval` end to end, offline, through the real CLI."""

import json
import subprocess
import sys

import pytest
import typer
from qponder_mlx.cli.main import app
from typer.testing import CliRunner

SMALL = ["--min-pixels", str(56 * 56), "--max-pixels", str(112 * 112)]


def test_dev_tiny_model_is_deterministic(tmp_path):
    r = CliRunner()
    for name in ("a", "b"):
        res = r.invoke(app, ["dev", "tiny-model", str(tmp_path / name), "--seed", "3"])
        assert res.exit_code == 0, res.output
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl"


def test_dev_tiny_model_sizes_and_dev_lists_only_it(tmp_path):
    r = CliRunner()
    res = r.invoke(app, ["dev", "tiny-model", str(tmp_path / "s"), "--hidden-size", "32",
                         "--vision-hidden", "32", "--vision-depth", "1"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["hidden_size"] == 32
    assert (cfg["vision_config"]["hidden_size"], cfg["vision_config"]["depth"]) == (32, 1)
    # the product's dev tools are the tiny model only; the miniature's live in experiments/
    commands = [c.name for c in typer.main.get_command(app).commands["dev"].commands.values()]
    assert commands == ["tiny-model"]
    assert "--vision-stem" not in r.invoke(app, ["dev", "tiny-model", "--help"]).output
    assert "--synthetic" not in r.invoke(app, ["distill", "--help"]).output


def test_eval_reason_mode_writes_a_full_report(tiny_model_dir, cc0_labels, tmp_path):
    out = tmp_path / "report.json"
    # The real console script, as a user runs it (a subprocess, offline env inherited).
    res = subprocess.run(
        [sys.executable, "-m", "qponder_mlx.cli.main", "eval", "--model", str(tiny_model_dir),
         "--data", str(cc0_labels), "--out", str(out), "--max-tokens", "12", "--limit", "10",
         *SMALL], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "SRCC" in res.stdout and "format-rate" in res.stdout
    rep = json.loads(out.read_text())
    assert rep["n_labels"] == 10 and rep["mode"] == "reason"
    assert len(rep["samples"]) == 10
    s0 = rep["samples"][0]
    assert {"id", "image", "mos", "score", "reasoning", "format_ok", "text", "error"} <= set(s0)
    assert 0.0 <= rep["format_rate"] <= 1.0
    # a random model almost never writes the format: the report says so instead of inventing
    assert rep["n_scored"] == sum(s["score"] is not None for s in rep["samples"])


def test_eval_fast_mode_scores_every_image(tiny_model_dir, cc0_labels, tmp_path):
    out = tmp_path / "fast.json"
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data",
                                   str(cc0_labels), "--mode", "fast", "--out", str(out), *SMALL])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["n_scored"] == rep["n_labels"] == 36
    assert rep["format_rate"] is None
    scores = [s["score"] for s in rep["samples"]]
    assert all(1.0 <= s <= 5.0 for s in scores) and len(set(scores)) > 1
    assert -1.0 <= rep["metrics"]["srcc"] <= 1.0


def test_eval_counts_bad_rows_and_images(tiny_model_dir, tmp_path, cc0_labels):
    img = cc0_labels.parent / "images" / "chelsea_noise_1.png"
    (tmp_path / "broken.png").write_bytes(b"not an image")
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join([
        json.dumps({"image": str(img), "mos": 3.9}),
        json.dumps({"image": str(img), "mos": "nan", "id": "bad-mos"}),
        json.dumps({"image": str(tmp_path / "missing.png"), "mos": 2.0}),
        json.dumps({"image": str(tmp_path / "broken.png"), "mos": 2.0}),
    ]) + "\n")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", str(labels),
                                   "--mode", "fast", "--out", str(out), *SMALL])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["n_bad_labels"] >= 2 and rep["n_scored"] == 1
    assert any("bad-mos" in p or "line 2" in p for p in rep["label_problems"])


@pytest.mark.parametrize("args, msg", [
    (["--model", "/no/such/folder"], "no such folder"),
    (["--model", "TINY", "--adapter", "/nope"], "adapter_config.json"),
    (["--model", "TINY", "--mos-range", "5,1"], "LO must be below HI"),
    (["--model", "/no/such/model", "--readout", "mean"], "--readout 'mean': expected text or"),
    (["--model", "/no/such/model", "--mode", "fast", "--readout", "expected"],
     "--readout expected is for --mode reason"),
])
def test_eval_bad_input_is_one_line(args, msg, tiny_model_dir, cc0_labels):
    args = [str(tiny_model_dir) if a == "TINY" else a for a in args]
    res = CliRunner().invoke(app, ["eval", "--data", str(cc0_labels), *args])
    assert res.exit_code == 2
    assert msg in res.output


def test_version_names_the_package_and_mlx_versions():
    from importlib.metadata import version

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.output.strip() == (f"qponder-mlx {version('qponder-mlx')} (mlx {version('mlx')}, "
                                  f"mlx-vlm {version('mlx-vlm')}, mlx-lm {version('mlx-lm')})")

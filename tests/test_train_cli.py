"""`qponder train`: TOML + flags + --set reach the config; resume reuses the run's config;
`--stage grpo` hands a GRPOConfig to the GRPO trainer; user errors are one line, exit 2."""

from __future__ import annotations

import json

import pytest
import typer
from qponder_mlx.cli.cmd_train import register
from typer.testing import CliRunner

from qponder_mlx.testing.sft_sets import cc0_sft_rows, write_jsonl


@pytest.fixture(scope="module")
def app():
    a = typer.Typer()
    register(a)

    @a.command("noop")  # a second command keeps typer from collapsing the group
    def _noop() -> None:
        pass

    return a


def _invoke(app, args):
    return CliRunner().invoke(app, ["train", *args])


def test_toml_flags_and_set_reach_the_run(tmp_path, app, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", cc0_sft_rows(2))
    toml = tmp_path / "sft.toml"
    toml.write_text(f'model = "{tiny_model_dir}"\ndata = "{data}"\niters = 50\n'
                    "batch_size = 2\nwarmup = 0\nmin_pixels = 3136\nmax_pixels = 12544\n"
                    "[lora]\nrank = 8\n")
    out = tmp_path / "run"
    r = _invoke(app, ["--config", str(toml), "--out", str(out), "--iters", "2",
                      "--lora-alpha", "4", "--set", "lora.target_modules=q_proj,v_proj",
                      "--set", "steps_per_report=1", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "done: adapter in" in r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["iters"] == 2  # flag over file
    assert cfg["lora"] == {"rank": 8, "alpha": 4.0, "dropout": 0.0,
                           "target_modules": ["q_proj", "v_proj"], "train_vision": False,
                           "train_merger": False}
    adapter = json.loads((out / "adapters" / "adapter_config.json").read_text())
    assert adapter["lora_parameters"]["rank"] == 8
    assert adapter["lora_parameters"]["scale"] == 0.5
    assert {k.rsplit(".", 1)[-1] for k in adapter["lora_parameters"]["keys"]} == \
        {"q_proj", "v_proj"}

    # --resume needs only --out: the run's saved config supplies model, data, lora...
    r = _invoke(app, ["--out", str(out), "--resume", "--iters", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # ...and a fresh run into the same folder is refused, not overwritten
    r = _invoke(app, ["--config", str(toml), "--out", str(out)])
    assert r.exit_code == 2 and "pass --resume" in r.output


@pytest.mark.parametrize("args, message", [
    (["--stage", "ppo"], "--stage 'ppo'"),
    (["--data", "x.jsonl", "--set", "lora.rnk=3"], "unknown key 'lora.rnk'"),
    (["--data", "x.jsonl", "--set", "iters"], "expected key=value"),
    (["--data", "x.jsonl", "--set", "iters=many"], "iters = 'many'"),
    (["--iters", "3"], "data is not set"),
])
def test_user_errors_are_one_line(app, args, message):
    r = _invoke(app, args)
    assert r.exit_code == 2
    assert message in r.output and r.output.count("error:") == 1


def test_missing_data_file_is_one_line(tmp_path, app, tiny_model_dir):
    r = _invoke(app, ["--model", str(tiny_model_dir), "--data", str(tmp_path / "no.jsonl"),
                      "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "no such data file" in r.output


def test_stage_grpo_gets_a_grpo_config(tmp_path, app, monkeypatch):
    import qponder_mlx.grpo.trainer as grpo_trainer
    from qponder_mlx.grpo.config import GRPOConfig

    seen = {}

    def fake_run(cfg, resume=False, **kw):
        seen.update(cfg=cfg, resume=resume)
        return tmp_path / "g"

    monkeypatch.setattr(grpo_trainer, "run_grpo", fake_run)
    toml = tmp_path / "grpo.toml"
    toml.write_text('data = "labels.csv"\ngroup_size = 4\n')
    r = _invoke(app, ["--stage", "grpo", "--config", str(toml), "--adapter", "runs/ci/adapters",
                      "--lora-rank", "4", "--set", "beta=0.1", "--out", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert isinstance(cfg, GRPOConfig) and seen["resume"] is False
    assert (cfg.data, cfg.group_size, cfg.adapter, cfg.lora.rank, cfg.beta) == \
        ("labels.csv", 4, "runs/ci/adapters", 4, 0.1)
    r = _invoke(app, ["--stage", "grpo", "--data", "x", "--val-data", "v.jsonl"])
    assert r.exit_code == 2 and "unknown key 'val_data'" in r.output

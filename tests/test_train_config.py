"""Configs: defaults < saved run config < TOML < flags, typed, with one-line errors."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qponder_mlx.train.config import (
    ConfigError,
    LoraConfig,
    SFTConfig,
    config_dict,
    load_config,
    parse_set_flags,
    read_config_file,
    save_config,
)


def test_layers_defaults_toml_flags(tmp_path):
    toml = tmp_path / "sft.toml"
    toml.write_text('data = "a.jsonl"\niters = 50\nlearning_rate = 2e-4\n'
                    '[lora]\nrank = 8\ntarget_modules = ["q_proj", "v_proj"]\n')
    cfg = load_config(SFTConfig, toml, {"iters": 7, "lora.dropout": "0.05", "batch_size": None})
    assert cfg.data == "a.jsonl"
    assert cfg.iters == 7  # flag beats file
    assert cfg.learning_rate == 2e-4  # file beats default
    assert cfg.batch_size == SFTConfig().batch_size  # an unset flag (None) keeps lower layers
    assert cfg.lora.rank == 8 and cfg.lora.dropout == 0.05
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora.alpha == LoraConfig().alpha  # untouched nested default survives


def test_set_strings_are_coerced_by_field_type():
    flags = parse_set_flags(["quantize_base=4", "grad_clip=none", "grad_checkpoint=true",
                             "lora.target_modules=q_proj,o_proj", "warmup=1_0"])
    cfg = load_config(SFTConfig, None, flags)
    assert cfg.quantize_base == 4 and isinstance(cfg.quantize_base, int)
    assert cfg.grad_clip is None
    assert cfg.grad_checkpoint is True
    assert cfg.lora.target_modules == ["q_proj", "o_proj"]
    assert cfg.warmup == 10


def test_unknown_key_names_key_and_file(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("[lora]\nrnk = 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, toml, {})
    msg = str(e.value)
    assert "lora.rnk" in msg and str(toml) in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="command line: unknown key .itres."):
        load_config(SFTConfig, None, {"itres": 3})


@pytest.mark.parametrize("key, value", [("iters", "ten"), ("iters", 2.5),
                                        ("grad_checkpoint", "maybe"), ("lora", 3),
                                        ("quantize_base", "four")])
def test_wrong_types_are_one_line_errors(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, None, {key: value})
    assert key in str(e.value) and "\n" not in str(e.value)


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "x.toml"
    bad.write_text("iters = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config_file(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        read_config_file(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set_flags(["lora.rank"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(SFTConfig, None, {"data": "d.jsonl", "lora.rank": 4, "val_data": None,
                                        "quantize_base": 4})
    path = save_config(cfg, tmp_path)
    again = load_config(SFTConfig, None, {}, base=read_config_file(path))
    assert again == cfg
    # the saved file is a base layer: flags still override it
    assert load_config(SFTConfig, None, {"iters": 3}, base=config_dict(cfg)).iters == 3


def test_any_dataclass_works():
    @dataclass
    class Inner:
        beta: float = 0.0

    @dataclass
    class Other:
        group: int = 4
        inner: Inner = field(default_factory=Inner)
        tags: list[int] = field(default_factory=list)

    cfg = load_config(Other, None, {"inner.beta": "0.04", "tags": "[1, 2]"})
    assert cfg.inner.beta == 0.04 and cfg.tags == [1, 2] and cfg.group == 4


def test_validate_rejects_nonsense():
    with pytest.raises(ConfigError, match="data is not set"):
        SFTConfig().validate()
    with pytest.raises(ConfigError, match="quantize_base"):
        SFTConfig(data="x", quantize_base=3).validate()
    with pytest.raises(ConfigError, match="warmup"):
        SFTConfig(data="x", iters=5, warmup=6).validate()
    with pytest.raises(ConfigError, match="lora.dropout"):
        SFTConfig(data="x", lora=LoraConfig(dropout=1.0)).validate()


def test_the_documented_toml_is_valid_and_complete(tmp_path):
    """docs/train.md's config example loads, and names every SFTConfig field."""
    from dataclasses import fields as dc_fields
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "train.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    toml = tmp_path / "example.toml"
    toml.write_text(block)
    cfg = load_config(SFTConfig, toml, {})
    defaults = SFTConfig()
    assert cfg.data == "distill/train.jsonl"
    # the documented values are the real defaults (data aside)
    for f in dc_fields(SFTConfig):
        if f.name != "data":
            assert getattr(cfg, f.name) == getattr(defaults, f.name), f.name
    names = {f.name for f in dc_fields(SFTConfig)} | {f.name for f in dc_fields(LoraConfig)}
    missing = [n for n in names - {"lora"} if f"{n} =" not in block]
    assert not missing and "[lora]" in block


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs")
                                        .glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_load_and_validate(path):
    """configs/*.toml are complete, valid configs of their stage (every key known, every value
    in range) for the real model they name."""
    from qponder_mlx.grpo.config import GRPOConfig

    cls = GRPOConfig if path.name.endswith(".grpo.toml") else SFTConfig
    cfg = load_config(cls, path, {"data": "x.jsonl"})
    cfg.validate()
    assert cfg.model.startswith("mlx-community/Qwen2.5-VL-")
    assert cfg.warmup is None or cfg.warmup <= cfg.iters

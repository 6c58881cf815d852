"""`qponder eval --out` writes strict JSON: an undefined correlation is null with its reason,
never NaN (which strict parsers, e.g. JavaScript's JSON.parse, reject)."""

import json

import pytest
from qponder_mlx.cli.main import app
from typer.testing import CliRunner


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_eval_report_of_one_image_is_strict_json(tiny_model_dir, cc0_labels, tmp_path):
    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data",
                                   str(cc0_labels), "--mode", "fast", "--limit", "1",
                                   "--min-pixels", "3136", "--max-pixels", "12544",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = _strict(out.read_text())
    assert report["metrics"]["srcc"] is None and report["metrics"]["plcc"] is None
    assert report["metrics_undefined"]["metrics.srcc"] == "needs at least 2 scored answers, got 1"
    assert "SRCC n/a" in res.output and "needs at least 2 scored answers" in res.output
    with pytest.raises(ValueError, match="not JSON: NaN"):
        _strict('{"srcc": NaN}')  # the parser really is strict

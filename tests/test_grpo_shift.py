"""bench/grpo_shift.py: GRPO's weight move against SFT's (a hand-computed LoRA example) and the
level moves between the two students' reasoning (hand-built reports in the teacher's words)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import mlx.core as mx
import pytest
from bench_loader import load_bench

from qponder_mlx.distill.synthetic_teacher import describe

LAYER = "language_model.model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def shift():
    return load_bench("grpo_shift")


def _adapter(d: Path, a: list, b: list, scale: float) -> None:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora",
         "lora_parameters": {"rank": 1, "scale": scale, "keys": [LAYER]}}))
    mx.save_safetensors(str(d / "adapters.safetensors"),
                        {f"{LAYER}.lora_a": mx.array(a), f"{LAYER}.lora_b": mx.array(b)})


def test_weight_shift_by_hand(shift, tmp_path):
    (tmp_path / "student_base").mkdir()
    # W (out × in) with ‖W‖ = 10
    mx.save_safetensors(str(tmp_path / "student_base" / "model.safetensors"),
                        {f"{LAYER}.weight": mx.array([[6.0, 0.0], [0.0, 8.0]])})
    # ΔW_sft = 2·A·B = 2·[[3, 4], [0, 0]]: ‖·‖ = 10
    _adapter(tmp_path / "sft" / "adapters", [[1.0], [0.0]], [[3.0, 4.0]], 2.0)
    # GRPO moved B by (0, 0.5): ΔW_grpo − ΔW_sft = 2·[[0, 0.5], [0, 0]], ‖·‖ = 1
    _adapter(tmp_path / "grpo" / "adapters", [[1.0], [0.0]], [[3.0, 4.5]], 2.0)
    # and its last step moved A instead:
    # 2·([[1], [1]]·[[3, 4]] − [[1], [0]]·[[3, 4]]) = 2·[[0, 0], [3, 4]], ‖·‖ = 10
    _adapter(tmp_path / "grpo" / "adapters_last", [[1.0], [1.0]], [[3.0, 4.0]], 2.0)
    got = shift.weight_shift(tmp_path)
    assert got["sft_vs_base"] == pytest.approx(1.0)
    assert got["grpo_adapters"] == pytest.approx(0.1)
    assert got["grpo_adapters_last"] == pytest.approx(1.0)


def _row(view: str, true: tuple[str, int], named: tuple[str, int] | None) -> dict:
    return {"id": f"{view}_{true[0]}_{true[1]}", "mos": 3.0, "score": 3.0,
            "reasoning": describe(*named, random.Random(0)) if named else "I cannot tell."}


def test_level_moves_count_each_kind(shift):
    cases = [  # view, true level, SFT's named level, GRPO's named level, the move
        ("a", ("blur", 3), ("blur", 3), ("blur", 3), "kept right"),
        ("b", ("noise", 2), ("noise", 2), ("noise", 3), "right → wrong"),
        ("c", ("jpeg", 4), ("jpeg", 5), ("jpeg", 4), "wrong → right"),
        ("d", ("jpeg", 2), ("jpeg", 3), ("noise", 1), "wrong → other wrong"),
        ("e", ("noise", 5), ("noise", 4), ("noise", 4), "kept wrong"),
        ("f", ("blur", 4), None, ("blur", 4), "wrong → right"),       # unreadable counts as wrong
        ("g", ("noise", 1), ("noise", 1), None, "right → wrong"),
    ]
    sft = {"samples": [_row(v, t, s) for v, t, s, _, _ in cases]}
    grpo = {"samples": [_row(v, t, g) for v, t, _, g, _ in cases]
            + [_row("h", ("blur", 1), ("blur", 1))]}               # only in one report: skipped
    got = shift.level_moves(sft, grpo)
    want: dict[str, int] = {}
    for *_, m in cases:
        want[m] = want.get(m, 0) + 1
    assert dict(got) == want
    assert sum(got.values()) == len(cases)

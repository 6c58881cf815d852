"""The benches' real-layout paths run end to end: `bench/score_speed.py` and `bench/grpo_speed.py`
on the Qwen2.5-VL-3B 4-bit fixture (mlx-community's layout) at their smallest settings print their
RESULT lines. Figures from these runs mean nothing (one repeat, one photo); the point is that the
paths the lead runs for the record do not break between runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, *args: str, cache: Path, timeout: float = 600) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, str(BENCH / script), "--flavour", "qwen2.5-vl-3b", "--dtype", "4bit",
           "--cache-dir", str(cache), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def results(stdout: str) -> dict[str, float]:
    """name -> value of each `RESULT <name> <value> goal <goal>  [quiet|busy]` line."""
    return {m[1]: float(m[2]) for m in
            re.finditer(r"^RESULT (\S+) (\S+) goal \S+  \[(?:quiet|busy)\]$", stdout, re.M)}


def test_score_bench_3b_4bit(q4_hub):
    # The session's fixture folder is the bench's cache: it finds the 4-bit copy built already.
    out = run_bench("score_speed.py", "--images", "1", "--max-tokens", "1", "--repeats", "1",
                    "--max-pixels", str(56 * 56), cache=q4_hub.parent)
    assert f"built {q4_hub}" not in out  # reused, not rebuilt
    assert "settings qwen2.5-vl-3b 4bit: 1 images, max_tokens 1" in out
    got = results(out)
    assert set(got) == {"score_reason_speedup_3b_4bit", "score_fast_speedup_3b_4bit"}, out
    assert all(v > 0 for v in got.values()), got


@pytest.mark.slow
def test_grpo_bench_3b_4bit(q4_hub):
    # Slow at any setting: mlx-vlm's 4-bit step alone takes ~3.5 min of CPU here, its loss taking
    # the 151,936-row head's logits at every position through MLX's CPU quantized matmul (the
    # warm-up step and one timed step: ~7 min on 2 quiet cores, ~12 min on a busy box).
    out = run_bench("grpo_speed.py", "--steps", "1", "--batch", "1", "--group-size", "2",
                    "--max-new", "2", cache=q4_hub.parent, timeout=1800)
    got = results(out)
    assert set(got) == {"grpo_step_speedup_3b_4bit", "grpo_peak_memory_ratio_3b_4bit"}, out
    assert all(v > 0 for v in got.values()), got

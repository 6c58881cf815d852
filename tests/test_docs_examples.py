"""The README's "Try it without a download" and docs/train.md's worked example run verbatim, from
a fresh folder, with only the installed `qponder` on PATH (what a new user types)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bash_block(doc: Path, after: str) -> str:
    text = doc.read_text()
    return re.search(r"```bash\n(.*?)```", text[text.index(after):], re.S).group(1)


def run_block(block: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_readme_try_it_runs_verbatim_from_any_folder(tmp_path):
    res = run_block(bash_block(ROOT / "README.md", "## Try it without a download"), tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "report.json").exists() and "SRCC" in res.stdout


@pytest.mark.slow
def test_train_worked_example_runs_verbatim(tmp_path):
    res = run_block(bash_block(ROOT / "docs" / "train.md", "## A worked example"), tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "runs" / "grpo" / "adapters" / "adapters.safetensors").exists()

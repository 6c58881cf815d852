#!/usr/bin/env bash
# Create .venv (if missing), install qponder-mlx with its test extras, run the test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
. scripts/blas_env.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"

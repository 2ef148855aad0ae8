#!/usr/bin/env bash
# The test command: makes .venv if needed, installs what the tests need, runs them.
# A torch already in the environment (CPU or CUDA) is kept; otherwise torch 2.13.0 is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0" || pip install -q torch
pip install -q -r requirements.txt -r tests/requirements.txt
python -m pytest tests -q "$@"

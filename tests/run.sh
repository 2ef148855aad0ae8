#!/usr/bin/env bash
# The test command: makes .venv if needed, installs what the tests need (once; see run.sh, which
# holds the install rules), runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
REQUIREMENTS="requirements.txt tests/requirements.txt" exec bash run.sh -m pytest tests -q "$@"

#!/usr/bin/env bash
# Grade lab NN (labs/README.md): one line per check, exit status 1 when one fails.
#   bash labs/check.sh NN                    # the project's own implementation
#   LAB_IMPL=starter bash labs/check.sh NN   # yours: labs/NN-slug/starter.py
#   LAB_IMPL=path/to/file.py bash labs/check.sh NN
#   bash labs/check.sh --full NN             # labs 03 and 04: the training runs (minutes)
# Like tests/gpu.sh: the python in $PYTHON when it is set, else the project's .venv as run.sh makes it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    exec "$PYTHON" -m labs.check "$@"
fi
exec bash run.sh -m labs.check "$@"

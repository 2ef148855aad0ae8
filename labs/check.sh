#!/usr/bin/env bash
# Grade lab NN (labs/README.md): one line per check, exit status 1 when one fails.
#   bash labs/check.sh NN                    # the project's own implementation
#   LAB_IMPL=starter bash labs/check.sh NN   # yours: labs/NN-slug/starter.py
#   LAB_IMPL=path/to/file.py bash labs/check.sh NN
#   bash labs/check.sh --full NN             # labs 03 and 04: the training runs (minutes)
# Like tests/gpu.sh: the python in $PYTHON when it is set, else the project's .venv as run.sh makes it.
set -euo pipefail
if [ -f "${LAB_IMPL:-}" ]; then  # a file path is the caller's: resolve it before moving to the repository root
    LAB_IMPL="$(cd "$(dirname "$LAB_IMPL")" && pwd)/$(basename "$LAB_IMPL")"
    export LAB_IMPL
fi
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    exec "$PYTHON" -m labs.check "$@"
fi
exec bash run.sh -m labs.check "$@"

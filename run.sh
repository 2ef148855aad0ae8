#!/usr/bin/env bash
# Run a project script with the project's Python, from a fresh clone or not:
#     bash run.sh sample.py --image data/zoom/example.png
# The first run makes .venv and installs requirements.txt into it (a torch already there is
# kept, else torch 2.13.0, else the newest pip finds); later runs start at once, because a stamp
# per requirements file (named by its checksum) records what is installed. tests/run.sh uses this
# script with REQUIREMENTS="requirements.txt tests/requirements.txt".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    echo "run.sh: making $VENV (once)" >&2
    "${PYTHON:-python3}" -m venv "$VENV"
fi
missing=()
for req in ${REQUIREMENTS:-requirements.txt}; do
    stamp="$VENV/.installed-$(cksum < "$ROOT/$req" | cut -d' ' -f1)"
    [ -f "$stamp" ] || missing+=("$req")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "run.sh: installing ${missing[*]} into $VENV (once)" >&2
    "$VENV/bin/python" -c "import torch" 2>/dev/null \
        || "$VENV/bin/python" -m pip install -q "torch==2.13.0" || "$VENV/bin/python" -m pip install -q torch
    (cd "$ROOT" && "$VENV/bin/python" -m pip install -q $(printf -- '-r %s ' "${missing[@]}"))
    for req in "${missing[@]}"; do touch "$VENV/.installed-$(cksum < "$ROOT/$req" | cut -d' ' -f1)"; done
fi
exec "$VENV/bin/python" "$@"

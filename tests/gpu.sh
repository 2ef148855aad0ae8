#!/usr/bin/env bash
# What only a GPU can check, in one go on one H100 (< 8 minutes):
#   1. the tests that compare float32, bf16 and int8 with the goldens, on cuda (DRAGONFLY_TEST_DEVICE,
#      tests/conftest.py: the models and their inputs on the GPU; pytest -m cuda runs any tests marked so);
#   2. python -m tools.bench --config full --device cuda, bf16 and int8, on random weights;
#   3. a few FSDP2 training steps of a 2+2-block model at full width, checkpointing off and on:
#      samples/s, MFU and peak memory, tools/plan.py's prediction beside each (tests/gpu_train.py).
#   bash tests/gpu.sh          # on a machine with CUDA
#   bash tests/gpu.sh --dry    # on CPU, toy sizes: that this script still runs (tests/test_plan.py)
#   RECIPE=release bash tests/gpu.sh   # step 3 with the release's training recipe (lib/release_recipe.py)
# --dry skips 1 and 2: tools/bench.py waits for a quiet CPU before each timing (minutes on a shared
# machine), and the tests are the suite's own; it prints their commands and runs 3 at toy size.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then  # a fresh clone: make .venv with the tests' packages, as tests/run.sh does
    REQUIREMENTS="requirements.txt tests/requirements.txt" bash run.sh -c "" >&2
fi
PY="${PYTHON:-.venv/bin/python}"
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
run() { echo "+ $*"; if [ "$DRY" = 0 ]; then "$@"; fi; }

echo "== 1. golden parity in bf16 and int8 (+ any tests marked cuda)"
run env DRAGONFLY_TEST_DEVICE=cuda "$PY" -m pytest -q tests/test_release_bf16.py tests/test_quantize.py tests/test_golden.py
run "$PY" -m pytest -q -m cuda tests --no-header -p no:cacheprovider || [ $? = 5 ]  # 5: none marked yet
echo "== 2. inference speed of the full model on random weights"
run "$PY" -m tools.bench --config full --device cuda --dtype bfloat16
run "$PY" -m tools.bench --config full --device cuda --dtype bfloat16 --quantize int8
echo "== 3. FSDP2 training steps, measured beside tools/plan.py's prediction"
if [ "$DRY" = 1 ]; then
    "$PY" tests/gpu_train.py --dry --recipe "${RECIPE:-ours}"
else
    "$PY" tests/gpu_train.py --device cuda --recipe "${RECIPE:-ours}"
fi

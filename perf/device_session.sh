#!/usr/bin/env bash
# The GPU session of perf/NOTES.md ("The next GPU session"), one call at a time; everything
# it measures goes under $OUT, each part bounded so that a slow part leaves the rest room.
#
#   COMMIT=<hash> bash perf/device_session.sh 1   GPU tests, short timings and stacks, variants
#                                                  (< 10 min)
#   COMMIT=<hash> bash perf/device_session.sh 2   make tune's sweep (about 7.6 min, resumable)
#   COMMIT=<hash> bash perf/device_session.sh 3   make perf's stack and step sections
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that comes back}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD"
# The device's copy of the tree may have no .git: pass COMMIT=<hash> with the command.
echo "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (pass COMMIT=)')}" \
    > "$OUT/commit.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

case "${1:-}" in
1)
    timeout 330 python3 -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
    timeout 150 python3 perf/gpu_check.py 2>&1 | tee "$OUT/gpu-timing.log"
    timeout 110 python3 perf/variants.py --out "$OUT" 2>&1 | tee "$OUT/variants.log"
    ;;
2)
    timeout 570 python3 perf/tune.py 2>&1 | tee "$OUT/tune.log"
    ;;
3)
    timeout 240 python3 perf/bench.py --stack only --dtypes bf16 fp16 --out "$OUT/stack" 2>&1 \
        | tee "$OUT/stack.log"
    timeout 240 python3 perf/bench.py --step only --out "$OUT/step" 2>&1 | tee "$OUT/step.log"
    ;;
*)
    echo "usage: OUT=DIR bash perf/device_session.sh 1|2|3" >&2
    exit 2
    ;;
esac
